"""Outpost: a local analytics buffering agent."""

__version__ = "0.1.0"

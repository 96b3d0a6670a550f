"""Supervisor: one loop per (upstream, key), batching, backoff, supervision."""

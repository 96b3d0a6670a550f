"""Transmit profiles: whether forwarding may send now, by network cost and power state.

``policy`` decides (pure), ``power`` reads the battery, ``metered/`` watches the
network's cost per platform, ``held`` says which queued events a hold holds, and
``monitor`` runs the sources and tells the forwarders when the profile changes.
"""

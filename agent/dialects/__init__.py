"""One module per local API: read its requests, hand the events to the sink, render its
replies and errors. Each exports a ``DIALECT`` record (base.py) listed in registry.py."""

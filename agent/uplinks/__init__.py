"""One module per upstream protocol, all behind the small Uplink protocol in base.py."""

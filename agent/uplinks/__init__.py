"""One module per upstream protocol, all behind the small Uplink contract in base.py;
registry.py lists them."""

"""`outpost service install|uninstall`: plans for systemd, launchd and Windows."""

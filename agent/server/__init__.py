"""The local HTTP server: the app, its guards and connection limits, admission control."""

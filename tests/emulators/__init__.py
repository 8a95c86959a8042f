"""Local emulators of external services, reached over real sockets."""

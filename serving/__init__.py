"""The gRPC server: sessions, batch scheduler, state store, metrics. Arrives with the serving
issue; this package is its home."""

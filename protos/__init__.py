"""The public gRPC API (`.proto` files) and the code generated from it."""

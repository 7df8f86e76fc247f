"""Python client library, chat CLI and load generator; they depend on `protos` only."""

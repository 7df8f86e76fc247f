"""The gRPC server: sessions whose memory lives in a model's state pool, stepped in batches.

`config` (settings from flags, environment and TOML), `wire` (tensors on the wire),
`errors` (what a request can get wrong, as gRPC status codes), `store` (where parked
sessions go), `sessions` (the session table and the export format), `engine` (one model:
its pool, its sessions and the batch loop), `metrics` (Prometheus), `service` (the RPC
handlers), `server` (start, serve, drain).
"""

"""The gRPC server: sessions whose memory lives in a model's state pool, stepped in batches.

From the top: `server` (start, serve, drain), `service` (the RPC handlers) and `rpc` (how a
request is admitted, answered and timed); per model, `engine` wires `lifecycle` (sessions'
create .. expire), `scheduler` (which calls run next), `slots` (slots and parking, in front
of `store`) and `pipeline` (launches in flight) over `worker_client`, which drives the
model's own process (`worker`) with the messages of `protocol`. docs/serving.md has the
path of one call through them.
"""

"""The Open Inference Protocol (KServe v2) with Triton's extensions: `grpc_service.proto` and
`model_config.proto` as Triton publishes them (vendored, BSD-3-Clause; docs/kserve.md), and
the code generated from them, whose descriptors live in a pool of their own (`pool`)."""

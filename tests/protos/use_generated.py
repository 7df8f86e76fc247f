"""Import and use every module generated in protos/ under whatever protobuf this Python has:
messages built, serialized and parsed, and one call through each generated service over a
real gRPC server on loopback. `tests.protos.protobuf_range` runs it under the lowest and the
highest protobuf pyproject.toml declares; `test_protobuf_range` under the installed one.

Prints the protobuf version and where it was imported from (the overlay check reads it).
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
import numpy as np
from google.protobuf import runtime_version

from protos import journal_pb2, memserve_pb2, memserve_pb2_grpc, tensors
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2


def use_messages() -> None:
    """Every generated message module: build, serialize, parse, compare."""
    step = memserve_pb2.StepRequest(session_id="s", request_id="r", expected_step=3)
    tensors.encode_into(step.inputs, np.arange(6, dtype=np.float32).reshape(2, 3))
    again = memserve_pb2.StepRequest.FromString(step.SerializeToString(deterministic=True))
    assert again == step and again.HasField("expected_step")
    assert tensors.decode(again.inputs, "inputs").tolist() == [[0, 1, 2], [3, 4, 5]]
    record = journal_pb2.Record(call=journal_pb2.CallCommitted(session_id="s", to_step=2))
    record.call.operations.add().encode = 7
    assert journal_pb2.Record.FromString(record.SerializeToString()) == record
    config = model_config_pb2.ModelConfig(name="m", max_batch_size=0)
    config.input.add(name="INPUT", data_type=model_config_pb2.TYPE_FP32, dims=[-1, 8])
    config.sequence_batching.max_sequence_idle_microseconds = 5
    response = grpc_service_pb2.ModelConfigResponse(config=config)
    parsed = grpc_service_pb2.ModelConfigResponse.FromString(response.SerializeToString())
    assert parsed.config.input[0].dims == [-1, 8]
    assert parsed.config.HasField("sequence_batching")


class MemServe(memserve_pb2_grpc.MemServeServicer):
    def ListModels(self, request: Any, context: Any) -> memserve_pb2.ListModelsResponse:  # noqa: N802
        return memserve_pb2.ListModelsResponse(models=[memserve_pb2.ModelInfo(name="echo")])


class Inference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request: Any, context: Any) -> grpc_service_pb2.ModelInferResponse:  # noqa: N802
        response = grpc_service_pb2.ModelInferResponse(model_name=request.model_name)
        for key, value in request.parameters.items():
            response.parameters[key].CopyFrom(value)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response


def use_services() -> None:
    """One call through each generated service's stub and servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    memserve_pb2_grpc.add_MemServeServicer_to_server(MemServe(), server)  # type: ignore[no-untyped-call]
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            models = memserve_pb2_grpc.MemServeStub(channel).ListModels(  # type: ignore[no-untyped-call]
                memserve_pb2.ListModelsRequest(), timeout=30
            )
            assert [m.name for m in models.models] == ["echo"]
            request = grpc_service_pb2.ModelInferRequest(model_name="m")
            request.parameters["sequence_id"].uint64_param = 2**64 - 1
            request.raw_input_contents.append(b"\x01\x02")
            answer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(  # type: ignore[no-untyped-call]
                request, timeout=30
            )
            assert answer.parameters["sequence_id"].uint64_param == 2**64 - 1
            assert list(answer.raw_output_contents) == [b"\x01\x02"]
    finally:
        server.stop(None)


def main() -> int:
    use_messages()
    use_services()
    runtime = runtime_version  # the version the generated code checks itself against
    version = f"{runtime.MAJOR}.{runtime.MINOR}.{runtime.PATCH}{runtime.SUFFIX}"
    print(version, runtime.__file__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

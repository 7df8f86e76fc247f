"""The committed generated code is what the pinned grpcio-tools makes from the .proto files,
and the Open Inference Protocol's copy of it lives beside Triton's own client."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos import memserve_pb2
from protos.inference import grpc_service_pb2, pool

ROOT = Path(__file__).resolve().parents[2]
# .proto -> the files grpcio-tools makes from it (only the services get a _grpc module)
GENERATED = {
    "protos/memserve.proto": ("memserve_pb2.py", "memserve_pb2.pyi", "memserve_pb2_grpc.py"),
    "protos/journal.proto": ("journal_pb2.py", "journal_pb2.pyi"),
    "protos/inference/grpc_service.proto": (
        "grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py",
    ),
    "protos/inference/model_config.proto": ("model_config_pb2.py", "model_config_pb2.pyi"),
}  # fmt: skip


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    for proto in GENERATED:
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / proto, tmp_path / proto)
    for proto, names in GENERATED.items():
        grpc_out = ["--grpc_python_out=."] if any("_grpc" in name for name in names) else []
        command = [
            sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
            "--pyi_out=.", *grpc_out, proto,
        ]  # fmt: skip
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
        folder = Path(proto).parent
        for name in names:
            fresh_path = tmp_path / folder / name
            if folder.name == "inference" and name.endswith("_pb2.py"):
                fresh_path.write_text(pool.privatize(fresh_path.read_text()))
            fresh = fresh_path.read_bytes()
            assert fresh == (ROOT / folder / name).read_bytes(), f"{name} is stale: make protos"


def test_the_service_offers_every_rpc_of_the_api() -> None:
    service = memserve_pb2.DESCRIPTOR.services_by_name["MemServe"]
    assert service.full_name == "memserve.v1.MemServe"
    methods = {method.name: method for method in service.methods}
    assert sorted(methods) == sorted(
        [
            "ListModels", "CreateSession", "Step", "StepStream", "GetSession", "ForkSession",
            "ExportSession", "ImportSession", "DeleteSession", "Generate",
        ]
    )  # fmt: skip
    stream = methods["StepStream"]
    assert stream.client_streaming and stream.server_streaming
    assert not methods["Step"].client_streaming and not methods["Step"].server_streaming
    generate = methods["Generate"]
    assert generate.server_streaming and not generate.client_streaming


def test_the_inference_protocol_is_the_one_triton_clients_call() -> None:
    """The method paths (`/inference.GRPCInferenceService/ModelInfer`) are what a client
    sends; the descriptors sit in the private pool, not protobuf's default one."""
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    methods = {method.name: method for method in service.methods}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                 "ModelConfig", "ModelInfer"):  # fmt: skip
        assert not methods[name].client_streaming and not methods[name].server_streaming
    assert methods["ModelStreamInfer"].client_streaming
    assert methods["ModelStreamInfer"].server_streaming
    assert grpc_service_pb2.DESCRIPTOR.pool is pool.POOL
    assert pool.POOL.FindServiceByName("inference.GRPCInferenceService") is service


@pytest.mark.parametrize("first", ["memserve", "tritonclient"])
def test_memserve_and_tritonclient_import_in_one_process(first: str) -> None:
    """Both define `inference.ModelInferRequest`: in one pool that is a duplicate symbol,
    whichever comes second. A message of either reads the other's bytes."""
    ours = "from protos.inference import grpc_service_pb2 as ours\n"
    theirs = "from tritonclient.grpc import service_pb2 as theirs\n"
    script = (ours + theirs if first == "memserve" else theirs + ours) + (
        "request = ours.ModelInferRequest(model_name='m')\n"
        "request.parameters['sequence_id'].string_param = 'a'\n"
        "copy = theirs.ModelInferRequest.FromString(request.SerializeToString())\n"
        "assert copy.parameters['sequence_id'].string_param == 'a', copy\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)


def test_privatize_refuses_what_protoc_did_not_write() -> None:
    with pytest.raises(ValueError, match="descriptor_pool import"):
        pool.privatize("x = 1\n")

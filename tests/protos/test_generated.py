"""The committed generated code is what the pinned grpcio-tools makes from the .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from protos import memserve_pb2

ROOT = Path(__file__).resolve().parents[2]
# .proto -> the files grpcio-tools makes from it (only the public API has a service)
GENERATED = {
    "memserve.proto": ("memserve_pb2.py", "memserve_pb2.pyi", "memserve_pb2_grpc.py"),
    "journal.proto": ("journal_pb2.py", "journal_pb2.pyi"),
}


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    for proto, names in GENERATED.items():
        shutil.copy(ROOT / "protos" / proto, tmp_path / "protos")
        grpc_out = ["--grpc_python_out=."] if any("_grpc" in name for name in names) else []
        command = [
            sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
            "--pyi_out=.", *grpc_out, f"protos/{proto}",
        ]  # fmt: skip
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
        for name in names:
            fresh = (tmp_path / "protos" / name).read_bytes()
            assert fresh == (ROOT / "protos" / name).read_bytes(), f"{name} is stale: make protos"


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

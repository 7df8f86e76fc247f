"""The pieces of `tests.protos.protobuf_range` that need no network: the declared range
starts no lower than the generated code needs, and the code works under the protobuf
installed here. (`make test` runs the whole of it, under the lowest and highest.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from tests.protos import use_generated
from tests.protos.protobuf_range import declared_range, gencode_versions, lowest


def test_the_lowest_protobuf_declared_runs_every_generated_file() -> None:
    """Gencode never runs on an older runtime: each file's version <= the lowest bound."""
    floor = Version(lowest(declared_range()))
    versions = gencode_versions()
    assert "inference/grpc_service_pb2.py" in versions and "memserve_pb2.py" in versions
    for name, version in versions.items():
        assert Version(version) <= floor, f"{name} needs protobuf {version}; pyproject says {floor}"


def test_tritonclients_protobuf_lies_in_the_range() -> None:
    """tritonclient[grpc] 2.73 asks protobuf>=6.30,<7: the range must meet it."""
    declared = declared_range()
    assert "6.30.0" in declared and "6.33.6" in declared and "7.36.2" in declared


def test_the_range_is_read_from_pyproject(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["grpcio", "protobuf>=6.30.0,<8"]\n')
    assert lowest(declared_range(pyproject)) == "6.30.0"
    pyproject.write_text('[project]\ndependencies = ["protobuf<8"]\n')
    with pytest.raises(ValueError, match="'>=' bound"):
        lowest(declared_range(pyproject))
    pyproject.write_text('[project]\ndependencies = ["grpcio"]\n')
    with pytest.raises(LookupError):
        declared_range(pyproject)


def test_the_generated_code_works_under_the_installed_protobuf() -> None:
    use_generated.use_messages()
    use_generated.use_services()

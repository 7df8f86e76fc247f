"""The README's calls work: its Python example runs against a real server, and the JSON
bodies of its grpcurl lines parse into the requests they name (proto3 JSON mapping, as
grpcurl reads them) and succeed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from google.protobuf import json_format

from bench.child_server import ServerProcess
from protos import memserve_pb2
from tests.serving.client import create

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = README.read_text().split("## Calling the server", 1)[1].split("\n## ", 1)[0]


def test_python_examples_run(server: ServerProcess) -> None:
    """memserve.v1's example, then the Triton client's, which reuses its inputs."""
    namespace: dict[str, object] = {}
    for code in re.findall(r"```python\n(.*?)```", SECTION, flags=re.DOTALL):
        code = code.replace("127.0.0.1:50051", server.target)
        exec(compile(code, str(README), "exec"), namespace)
    assert "client" in namespace and namespace["outputs"].shape == (11, 8)  # type: ignore[attr-defined]


def test_grpcurl_bodies_are_valid_requests(server: ServerProcess) -> None:
    (block,) = re.findall(r"```sh\n(.*?)```", SECTION, flags=re.DOTALL)
    stub = server.stub()
    session_id = create(stub)
    calls = 0
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[0] != "grpcurl" or "-d" not in words:
            continue
        body = words[words.index("-d") + 1].replace("SESSION_ID", session_id)
        method = next(w for w in words if w.startswith("memserve.v1.")).rsplit("/", 1)[1]
        if method == "Generate":  # parses; this server has no dialogue model to run it
            request = json_format.Parse(body, memserve_pb2.GenerateRequest())
            assert request.text and request.max_tokens == 32
            continue
        request_type = {"CreateSession": memserve_pb2.CreateSessionRequest,
                        "Step": memserve_pb2.StepRequest}[method]  # fmt: skip
        reply = getattr(stub, method)(json_format.Parse(body, request_type()))
        calls += 1
        if method == "Step":
            assert reply.step == 1 and list(reply.outputs.shape) == [1, 8]
    assert calls == 2

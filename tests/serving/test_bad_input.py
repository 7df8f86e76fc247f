"""Every bad request gets INVALID_ARGUMENT or NOT_FOUND with a message naming the field, and
leaves the session as it was: its step count, and the outputs of its next good step."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from bench.child_server import ServerProcess
from models.base import MemoryModel
from protos import memserve_pb2
from serving import wire
from tests.serving.client import create, info, metric, scrape, step
from tests.serving.conftest import Reference, random_inputs

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def tensor(array: np.ndarray, **override: object) -> memserve_pb2.Tensor:
    message = wire.encode(array)
    for name, value in override.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)
        else:
            setattr(message, name, value)
    return message


GOOD = np.full((2, 9), 0.5, dtype=np.float32)
NAN = GOOD.copy()
NAN[1, 3] = math.nan
INF = GOOD.copy()
INF[0, 0] = math.inf

# (case, inputs tensor, status, words the message must contain)
STEP_CASES: list[tuple[str, memserve_pb2.Tensor | None, grpc.StatusCode, tuple[str, ...]]] = [
    ("float64", wire.encode(GOOD.astype(np.float64)), INVALID, ("inputs.dtype", "float32")),
    ("unknown dtype", tensor(GOOD, dtype="bfloat17"), INVALID, ("inputs.dtype", "bfloat17")),
    ("wrong width", wire.encode(np.zeros((2, 8), np.float32)), INVALID, ("inputs.shape", "9")),
    ("1-D", wire.encode(np.zeros(9, np.float32)), INVALID, ("inputs.shape",)),
    ("3-D", wire.encode(np.zeros((1, 2, 9), np.float32)), INVALID, ("inputs.shape",)),
    ("short data", tensor(GOOD, data=GOOD.tobytes()[:-4]), INVALID, ("inputs.data", "bytes")),
    ("long data", tensor(GOOD, data=GOOD.tobytes() + b"\0" * 4), INVALID, ("inputs.data",)),
    ("negative size", tensor(GOOD, shape=[-2, -9], data=b""), INVALID, ("inputs.shape",)),
    ("T = 0", wire.encode(np.zeros((0, 9), np.float32)), INVALID, ("inputs.shape[0]", "T")),
    ("T over the limit", wire.encode(np.zeros((65, 9), np.float32)), INVALID, ("64", "T")),
    ("NaN", wire.encode(NAN), INVALID, ("inputs", "NaN")),
    ("Inf", wire.encode(INF), INVALID, ("inputs", "Inf")),
    ("missing inputs", None, INVALID, ("inputs is missing",)),
]


@pytest.mark.parametrize(
    ("case", "inputs", "code", "words"), STEP_CASES, ids=[c[0] for c in STEP_CASES]
)
def test_bad_step_is_refused_and_changes_nothing(
    server: ServerProcess,
    models: dict[str, MemoryModel],
    case: str,
    inputs: memserve_pb2.Tensor | None,
    code: grpc.StatusCode,
    words: tuple[str, ...],
) -> None:
    stub = server.stub()
    session_id = create(stub)
    reference = Reference(models["ntm-copy"])
    rng = np.random.default_rng()
    first = random_inputs(rng, 3, 9)
    step(stub, session_id, first)
    reference.step(first)
    request = memserve_pb2.StepRequest(session_id=session_id)
    if inputs is not None:
        request.inputs.CopyFrom(inputs)
    rejected_before = metric(scrape(server.metrics_url), "memserve_requests_rejected_total")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Step(request)
    assert refused.value.code() == code, refused.value.details()
    for word in words:
        assert word in refused.value.details()
    # The stream refuses it the same way.
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.StepStream(iter([request])))
    assert streamed.value.code() == code
    assert info(stub, session_id).step == 3
    then = random_inputs(rng, 2, 9)
    outputs, count = step(stub, session_id, then)
    assert np.array_equal(outputs, reference.step(then)) and count == 5
    rejected = metric(scrape(server.metrics_url), "memserve_requests_rejected_total")
    assert rejected - rejected_before == 2


SESSION_CASES: list[tuple[str, Callable[[object, str], object], grpc.StatusCode, str]] = [
    ("unknown session", lambda stub, _: step(stub, "0" * 32, GOOD),  # type: ignore[arg-type]
     NOT_FOUND, "no session"),
    ("empty session id", lambda stub, _: step(stub, "", GOOD), INVALID,  # type: ignore[arg-type]
     "session_id"),
    ("unknown model", lambda stub, _: create(stub, "ntm-nope"), NOT_FOUND,  # type: ignore[arg-type]
     "ntm-nope"),
    ("empty model", lambda stub, _: create(stub, ""), INVALID, "model"),  # type: ignore[arg-type]
    ("negative ttl", lambda stub, _: create(stub, ttl_seconds=-1.0),  # type: ignore[arg-type]
     INVALID, "ttl_seconds"),
    ("NaN ttl", lambda stub, _: create(stub, ttl_seconds=math.nan),  # type: ignore[arg-type]
     INVALID, "ttl_seconds"),
    ("ttl over the maximum", lambda stub, _: create(stub, ttl_seconds=1e9),  # type: ignore[arg-type]
     INVALID, "ttl_seconds"),
    ("fork ttl", lambda stub, s: stub.ForkSession(  # type: ignore[attr-defined]
        memserve_pb2.ForkSessionRequest(session_id=s, ttl_seconds=0.0)), INVALID, "ttl_seconds"),
    ("garbage import", lambda stub, _: stub.ImportSession(  # type: ignore[attr-defined]
        memserve_pb2.ImportSessionRequest(state=b"not a safetensors file")), INVALID, "state"),
    ("empty import", lambda stub, _: stub.ImportSession(  # type: ignore[attr-defined]
        memserve_pb2.ImportSessionRequest()), INVALID, "state"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "call", "code", "word"), SESSION_CASES, ids=[c[0] for c in SESSION_CASES]
)
def test_bad_session_request_is_refused(
    server: ServerProcess,
    case: str,
    call: Callable[[object, str], object],
    code: grpc.StatusCode,
    word: str,
) -> None:
    stub = server.stub()
    session_id = create(stub)
    step_before = info(stub, session_id).step
    with pytest.raises(grpc.RpcError) as refused:
        call(stub, session_id)
    assert refused.value.code() == code, refused.value.details()
    assert word in refused.value.details()
    assert info(stub, session_id).step == step_before


def test_a_stream_stays_with_its_session(server: ServerProcess) -> None:
    stub = server.stub()
    session_id = create(stub)
    requests = [
        memserve_pb2.StepRequest(session_id=session_id, inputs=wire.encode(GOOD)),
        memserve_pb2.StepRequest(session_id="f" * 32, inputs=wire.encode(GOOD)),
    ]
    responses = stub.StepStream(iter(requests))
    assert next(responses).step == 2
    with pytest.raises(grpc.RpcError) as refused:
        next(responses)
    assert refused.value.code() == INVALID
    assert "one stream per session" in refused.value.details()
    assert info(stub, session_id).step == 2


def test_import_of_another_models_state_is_refused(server: ServerProcess) -> None:
    """A state whose tensors do not fit the model named in it changes nothing."""
    stub = server.stub()
    ntm = create(stub)
    exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=ntm)).state
    from serving.export import export_state, import_state

    state = import_state(exported)
    dnc = create(stub, "dnc-recall")
    dnc_export = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=dnc)).state
    dnc_digest = import_state(dnc_export).model_digest
    forged = export_state(state.tensors, "dnc-recall", dnc_digest, state.step)
    sessions_before = metric(scrape(server.metrics_url), "memserve_sessions")
    with pytest.raises(grpc.RpcError) as refused:
        stub.ImportSession(memserve_pb2.ImportSessionRequest(state=forged))
    assert refused.value.code() == INVALID and "dnc-recall" in refused.value.details()
    for step_count in (2**64, -1):
        forged = export_state(state.tensors, "ntm-copy", state.model_digest, step_count)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ImportSession(memserve_pb2.ImportSessionRequest(state=forged))
        assert refused.value.code() == INVALID and "out of range" in refused.value.details()
    no_digest = export_state(state.tensors, "ntm-copy", "", state.step)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ImportSession(memserve_pb2.ImportSessionRequest(state=no_digest))
    assert refused.value.code() == INVALID and "model_digest" in refused.value.details()
    other_weights = export_state(state.tensors, "ntm-copy", "0" * 64, state.step)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ImportSession(memserve_pb2.ImportSessionRequest(state=other_weights))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different weights" in refused.value.details()
    assert metric(scrape(server.metrics_url), "memserve_sessions") == sessions_before

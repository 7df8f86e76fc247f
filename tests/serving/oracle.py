"""The oracle of the soak tests that kill servers under load (tests/serving/test_durability.py,
tests/cluster/test_failover.py): each session's acknowledged calls, as its client recorded
them, replayed in order on a reference server that never failed (a memory-store server
with the same models and options) answer the same bit for bit, and the session ends in the
same state. A step lost or doubled anywhere shows as a different step count, output or state.

Calls name their session in the routing header when `metadata` is given (through Envoy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving.export import import_state
from serving.wire import decode, encode

LIMIT = 12  # the replies' max_tokens
Metadata = Sequence[tuple[str, str]]
# What a client recorded of one acknowledged call: ("step", inputs, StepResponse) or
# ("generate", (text, seed), (pieces, done)).
Call = tuple[str, Any, Any]


def step(
    stub: MemServeStub, session: str, inputs: np.ndarray, request_id: str = "",
    metadata: Metadata = (), timeout: float = 60,
) -> Any:  # fmt: skip
    request = memserve_pb2.StepRequest(
        session_id=session, inputs=encode(inputs), request_id=request_id
    )
    return stub.Step(request, timeout=timeout, metadata=metadata)


def generate(
    stub: MemServeStub, session: str, text: str, seed: int, request_id: str = "",
    metadata: Metadata = (), timeout: float = 60,
) -> Any:  # fmt: skip
    """(pieces, done) of one Generate call."""
    pieces, done = [], None
    request = memserve_pb2.GenerateRequest(
        session_id=session, text=text, seed=seed, max_tokens=LIMIT, request_id=request_id
    )
    for message in stub.Generate(request, timeout=timeout, metadata=metadata):
        if message.HasField("done"):
            done = message.done
        else:
            pieces.append(message.text)
    assert done is not None
    return pieces, done


def state_of(
    stub: MemServeStub, session: str, metadata: Metadata = ()
) -> tuple[int, dict[str, np.ndarray]]:
    """The session's step and its state's tensors (ExportSession)."""
    exported = stub.ExportSession(
        memserve_pb2.ExportSessionRequest(session_id=session), metadata=metadata, timeout=60
    )
    tensors = import_state(exported.state).tensors
    return exported.step, {name: t.numpy() for name, t in tensors.items()}


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Bit for bit (NaNs too)."""
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def replay(
    reference: MemServeStub, model: str, calls: Sequence[Call],
    served: MemServeStub, session: str, metadata: Metadata = (),
) -> None:  # fmt: skip
    """`calls` (a session's acknowledged calls, in order) on a new session of `reference`
    answer as they were answered, and `session` on `served` ends where that one does."""
    twin = reference.CreateSession(memserve_pb2.CreateSessionRequest(model=model)).session_id
    for number, (kind, request, answer) in enumerate(calls):
        if kind == "step":
            again = step(reference, twin, request)
            assert again.step == answer.step, (session, number, again.step, answer.step)
            assert np.array_equal(decode(again.outputs, "o"), decode(answer.outputs, "o")), (
                session, number,
            )  # fmt: skip
        else:
            assert generate(reference, twin, *request) == answer, (session, number)
    mine, theirs = state_of(served, session, metadata), state_of(reference, twin)
    assert mine[0] == theirs[0], (session, mine[0], theirs[0])
    assert same_state(mine[1], theirs[1]), session

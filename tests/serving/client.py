"""Small helpers over the generated stub, so the tests read as what they check. The server's
metrics are read with the load generator's scraper, the one of the repository: `scrape(url)`
gives every sample by (name, sorted labels), `metric(samples, name, **labels)` their sum."""

from __future__ import annotations

import numpy as np

from clients.loadgen.server_metrics import scrape, total
from protos import memserve_pb2, tensors
from protos.memserve_pb2_grpc import MemServeStub

__all__ = ["create", "info", "metric", "scrape", "step", "wait_for_launches"]

metric = total


def create(stub: MemServeStub, model: str = "ntm-copy", ttl_seconds: float | None = None) -> str:
    info = stub.CreateSession(
        memserve_pb2.CreateSessionRequest(model=model, ttl_seconds=ttl_seconds)
    )
    session_id: str = info.session_id
    return session_id


def step(
    stub: MemServeStub, session_id: str, inputs: np.ndarray, expected_step: int | None = None
) -> tuple[np.ndarray, int]:
    """Outputs and the new step count of one Step call."""
    request = memserve_pb2.StepRequest(session_id=session_id, inputs=tensors.encode(inputs))
    if expected_step is not None:
        request.expected_step = expected_step
    response = stub.Step(request)
    return tensors.decode(response.outputs, "outputs").copy(), int(response.step)


def info(stub: MemServeStub, session_id: str) -> memserve_pb2.SessionInfo:
    reply: memserve_pb2.SessionInfo = stub.GetSession(
        memserve_pb2.GetSessionRequest(session_id=session_id)
    )
    return reply


def wait_for_launches(url: str, at_least: int = 1, seconds: float = 30.0) -> None:
    """Return once the server has run `at_least` batched launches (its batch-size count)."""
    import time

    deadline = time.monotonic() + seconds
    while metric(scrape(url), "memserve_batch_size_count") < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} launches in {seconds} s"
        time.sleep(0.02)

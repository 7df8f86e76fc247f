"""Small helpers over the generated stub, so the tests read as what they check."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving import wire


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
    request = memserve_pb2.StepRequest(session_id=session_id, inputs=wire.encode(inputs))
    if expected_step is not None:
        request.expected_step = expected_step
    response = stub.Step(request)
    return wire.decode(response.outputs, "outputs").copy(), int(response.step)


def info(stub: MemServeStub, session_id: str) -> memserve_pb2.SessionInfo:
    reply: memserve_pb2.SessionInfo = stub.GetSession(
        memserve_pb2.GetSessionRequest(session_id=session_id)
    )
    return reply


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page by (name, sorted labels)."""
    from urllib.request import urlopen

    with urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def wait_for_launches(url: str, at_least: int = 1, seconds: float = 30.0) -> None:
    """Return once the server has run `at_least` batched launches (its batch-size count)."""
    import time

    deadline = time.monotonic() + seconds
    while metric(scrape(url), "memserve_batch_size_count") < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} launches in {seconds} s"
        time.sleep(0.02)

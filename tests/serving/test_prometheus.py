"""A real Prometheus scrapes a real memserve: the exposition parses, the target is up, and
PromQL over the server's histograms gives a latency and the counts this test caused.

Needs the `prometheus` binary (Debian's package; `make setup` installs it). The test starts
its own prometheus on a free loopback port with its storage under tmp_path.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from bench.child_server import ServerProcess
from protos import memserve_pb2, memserve_pb2_grpc
from serving import wire
from serving.config import ServerConfig
from tests.prometheus_server import (
    JOB,
    poll,
    prometheus_binary,
    running_prometheus,
    scalar,
    write_config,
)

MODEL = "ntm-copy"
SESSIONS = 3
STEPS_PER_CALL = 10  # more than one launch of steps_per_launch (8)
QUERY_SECONDS = 60.0
P99_STEP_LATENCY = (
    "histogram_quantile(0.99, sum by (le) "
    f'(rate(memserve_request_duration_seconds_bucket{{job="{JOB}",method="Step"}}[30s])))'
)


def step(stub: memserve_pb2_grpc.MemServeStub, session_id: str, input_size: int) -> None:
    """One Step call of STEPS_PER_CALL random steps."""
    inputs = np.random.default_rng().random((STEPS_PER_CALL, input_size), dtype=np.float32)
    request = memserve_pb2.StepRequest(session_id=session_id, inputs=wire.encode(inputs))
    outputs = wire.decode(stub.Step(request).outputs, "outputs")
    assert outputs.shape[0] == STEPS_PER_CALL and np.isfinite(outputs).all()


def test_prometheus_scrapes_server(tmp_path: Path) -> None:
    binary = prometheus_binary()
    with ServerProcess(tmp_path, "--models", MODEL) as server:
        stub = server.stub()
        models = stub.ListModels(memserve_pb2.ListModelsRequest()).models
        input_size = next(model.input_size for model in models if model.name == MODEL)
        sessions = [
            stub.CreateSession(memserve_pb2.CreateSessionRequest(model=MODEL)).session_id
            for _ in range(SESSIONS)
        ]
        calls = 0

        def step_all() -> None:
            nonlocal calls
            for session_id in sessions:
                step(stub, session_id, input_size)
                calls += 1

        step_all()
        config = write_config(tmp_path, server.metrics_port)
        with running_prometheus(binary, tmp_path, config) as base:

            def p99_while_stepping() -> float | None:
                step_all()  # the rate needs counts that grow between two scrapes
                value = scalar(base, P99_STEP_LATENCY)
                return value if value is not None and math.isfinite(value) else None

            p99 = poll("p99 Step latency", QUERY_SECONDS, p99_while_stepping)
            assert 0 < p99 < 10, f"p99 Step latency {p99} s is no plausible latency"

            target = f'job="{JOB}",instance="127.0.0.1:{server.metrics_port}"'
            assert scalar(base, f"up{{{target}}}") == 1

            # Stepping has stopped: a later scrape must show exactly what this test did. The
            # calls ran one at a time: each took its launches of one session.
            launches_per_call = math.ceil(STEPS_PER_CALL / ServerConfig().steps_per_launch)
            expected = {
                f'sum(memserve_request_duration_seconds_count{{{target},method="Step"}})': calls,
                f'memserve_request_duration_seconds_count{{{target},method="Step",code="OK"}}': (
                    calls
                ),
                f'memserve_batch_size_sum{{{target},model="{MODEL}"}}': calls * launches_per_call,
                f'memserve_sessions{{{target},model="{MODEL}",state="active"}}': SESSIONS,
                f'memserve_request_duration_seconds_count{{{target},method="CreateSession"}}': (
                    SESSIONS
                ),
            }

            deadline = time.monotonic() + QUERY_SECONDS
            while True:
                seen = {promql: scalar(base, promql) for promql in expected}
                if seen == expected:
                    break
                assert time.monotonic() < deadline, f"expected {expected}, Prometheus has {seen}"
                time.sleep(0.2)

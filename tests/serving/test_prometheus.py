"""A real Prometheus scrapes a real memserve: the exposition parses, the target is up, and
PromQL over the server's histograms gives a latency and the counts this test caused.

Needs the `prometheus` binary (Debian's package; `make setup` installs it). The test starts
its own prometheus on a free loopback port with its storage under tmp_path.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.child_server import ServerProcess
from protos import memserve_pb2, memserve_pb2_grpc
from serving import wire

MODEL = "ntm-copy"
JOB = "memserve"
SESSIONS = 3
STEPS_PER_CALL = 2
READY_SECONDS = 30.0
QUERY_SECONDS = 60.0
# Loopback only: no http_proxy from the environment.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
P99_STEP_LATENCY = (
    "histogram_quantile(0.99, sum by (le) "
    f'(rate(memserve_request_duration_seconds_bucket{{job="{JOB}",method="Step"}}[30s])))'
)


def prometheus_binary() -> str:
    """The path of `prometheus`; fails (never skips) when it is missing."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "the `prometheus` binary is not on PATH: run `make setup` "
            "(it installs Debian's prometheus package)"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, metrics_port: int) -> Path:
    """A prometheus.yml scraping the server's /metrics every second."""
    path = directory / "prometheus.yml"
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    return path


def get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET; (0, b"") when nothing answers."""
    try:
        with LOCAL.open(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait; SIGKILL if it does not exit."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_prometheus(binary: str, directory: Path, config: Path) -> Iterator[str]:
    """Start prometheus on a free 127.0.0.1 port, wait until it is ready, yield its base URL,
    stop it at the end. A port taken between choosing and binding it gets another try."""
    for attempt in range(3):
        address = f"127.0.0.1:{free_port()}"
        log_path = directory / f"prometheus-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / f'tsdb-{attempt}'}",
                    f"--web.listen-address={address}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + READY_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                if get(f"http://{address}/-/ready")[0] == 200:
                    yield f"http://{address}"
                    return
                time.sleep(0.1)
            exited = process.poll() is not None
        finally:
            stop(process)
        text = log_path.read_text(errors="replace")
        if not (exited and "address already in use" in text):
            break
    pytest.fail(f"prometheus exited or was not ready within {READY_SECONDS} s; its log:\n{text}")


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query."""
    status, body = get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert status == 200, f"query {promql!r} answered {status}: {body!r}"
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    assert answer["data"]["resultType"] == "vector", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def scalar(base: str, promql: str) -> float | None:
    """The value of a query that gives one series; None while it gives none."""
    result = query(base, promql)
    if not result:
        return None
    assert len(result) == 1, f"{promql!r} gave {len(result)} series: {result}"
    return float(result[0]["value"][1])


def poll(
    description: str, seconds: float, attempt: Callable[[], float | None], between: float = 0.2
) -> float:
    """Call `attempt` until it returns a number; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    last: float | None = None
    while time.monotonic() < deadline:
        last = attempt()
        if last is not None:
            return last
        time.sleep(between)
    pytest.fail(f"{description}: no answer in {seconds} s (last: {last})")


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

            # Stepping has stopped: a later scrape must show exactly what this test did.
            expected = {
                f'sum(memserve_request_duration_seconds_count{{{target},method="Step"}})': calls,
                f'memserve_request_duration_seconds_count{{{target},method="Step",code="OK"}}': (
                    calls
                ),
                f'memserve_batch_size_sum{{{target},model="{MODEL}"}}': calls * STEPS_PER_CALL,
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

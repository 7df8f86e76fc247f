"""A real Prometheus for the tests: started by them on a free loopback port with its storage
under their tmp_path, asked PromQL over its HTTP API, stopped at the end. Needs Debian's
`prometheus` (`make system-deps` installs it)."""

from __future__ import annotations

import json
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

import pytest

JOB = "memserve"
READY_SECONDS = 30.0
# Loopback only: no http_proxy from the environment.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def write_config(directory: Path, *metrics_ports: int, job: str = JOB) -> Path:
    """A prometheus.yml scraping the servers' /metrics every second."""
    path = directory / "prometheus.yml"
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in metrics_ports)
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {job}\n"
        "    static_configs:\n"
        f"      - targets: [{targets}]\n"
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

"""A real `memserve serve` in a child process on free loopback ports, for the tests.

The server logs JSON lines to a file; `start` waits for its "serving" line to learn the
ports it bound (port 0 = any free port). Kernels run on the PyTorch reference: the test
process sets TRITON_INTERPRET=1 for its own kernel tests, which the server must not inherit
(the interpreter is far too slow to serve).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from protos import memserve_pb2_grpc

STARTUP_SECONDS = 60.0


class ServerProcess:
    """`memserve serve ARGS...` on 127.0.0.1 with any free gRPC and metrics port."""

    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self.args = ["--port", "0", "--metrics-port", "0", *args]
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        self.channels: list[grpc.Channel] = []

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update({"MEMSERVE_KERNEL_BACKEND": "torch", **self.extra_env})
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "memserve", "serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            serving = self.event("serving")
            if serving is not None:
                self.port = serving["port"]
                self.metrics_port = serving["metrics_port"]
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start in {STARTUP_SECONDS} s:\n{self.log_text()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        """A channel to the server (straight to loopback, whatever http_proxy says)."""
        channel = grpc.insecure_channel(self.target, options=[("grpc.enable_http_proxy", 0)])
        self.channels.append(channel)
        return channel

    def stub(self) -> memserve_pb2_grpc.MemServeStub:
        return memserve_pb2_grpc.MemServeStub(self.channel())  # type: ignore[no-untyped-call]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """Every structured log line so far."""
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line still being written
        return lines

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def signal(self, number: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit code."""
        for channel in self.channels:
            channel.close()
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

"""A server in a child process on loopback, for the benchmarks and the tests: `memserve
serve` (or `bench/serving.py`'s echo server) on any free port, known once it logs its
"serving" line; stopped by PID.

It lives in bench/ because bench/ and tests/ both start servers this way and the layers let
only one of them import the other: tests/ may import bench/ (the benchmark tests do), bench/
never imports tests/, and clients/ is the library users install, which starts no server.

The server logs JSON lines to a file; `start` waits for its "serving" line to learn the
ports it bound (port 0 = any free port). Kernels run on the PyTorch reference: the test
process sets TRITON_INTERPRET=1 for its own kernel tests, which a server must not inherit
(the interpreter is far too slow to serve).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from protos import memserve_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120.0
KERNEL_BACKEND = "torch"  # MEMSERVE_KERNEL_BACKEND of every server started here


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server started here: this process's, without TRITON_INTERPRET,
    with the kernel backend set, then `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"MEMSERVE_KERNEL_BACKEND": KERNEL_BACKEND, **(extra or {})})
    return env


def process_stat(pid: int | str) -> tuple[int, float] | None:
    """The parent's pid and the user + system CPU seconds of process `pid` so far (from
    /proc/PID/stat); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = process_stat(entry.name)
        if stat is not None and stat[0] == pid:
            found.append(int(entry.name))
    return found


class ChildServer:
    """`command` in a child process (cwd: the repository), its output in a log file under
    `log_dir`; `start` returns once it logs `{"event": "serving", "port": ...}`, with its
    "metrics_port" if it has one (else -1). `env` is added to the environment."""

    def __init__(
        self,
        command: list[str],
        log_dir: Path,
        *,
        name: str = "server",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.extra_env = env or {}
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = -1
        self.channels: list[grpc.Channel] = []

    def start(self) -> ChildServer:
        env = child_env(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            serving = self.event("serving")
            if serving is not None:
                self.port = int(serving["port"])
                self.metrics_port = int(serving.get("metrics_port", -1))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_text()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {STARTUP_SECONDS} s:\n{self.log_text()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def channel(self) -> grpc.Channel:
        """A channel to the server (straight to loopback, whatever http_proxy says), closed
        when the server stops."""
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

    def backends(self) -> dict[str, str]:
        """What steps each model, as the server logged it once loaded ("fused-cpu", "torch",
        "triton"); empty for a server that logs none (the echo server)."""
        return {
            str(e["model"]): str(e["backend"])
            for e in self.events()
            if e.get("event") == "model_loaded"
        }

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block, then continued: a call made meanwhile
        provably gets no answer before the block ends, whatever its deadline. Returns once
        the process has stopped (the kernel says so), not merely been signalled."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            _, status = os.waitpid(self.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"{self.name} ended instead of stopping:\n{self.log_text()}")
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the child and its own children (the memserve model
        processes) have used so far (from /proc)."""
        total = 0.0
        for entry in Path("/proc").glob("[0-9]*"):
            stat = process_stat(entry.name)
            if stat is not None and self.pid in (int(entry.name), stat[0]):
                total += stat[1]
        return total

    def children(self) -> list[int]:
        """The processes whose parent is the server (its model processes)."""
        return children_of(self.pid)

    def kill(self, wait: float = 10.0) -> bool:
        """kill -9 of the server; True if its children then exited by themselves within
        `wait` seconds (a model process sees its pipe close), else they are killed too."""
        if self.process is None or self.process.poll() is not None:
            return True
        left = self.children()
        self.signal(signal.SIGKILL)
        self.wait()
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            left = [pid for pid in left if Path(f"/proc/{pid}").exists()]
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return not left

    def signal(self, number: int = signal.SIGTERM) -> None:
        os.kill(self.pid, number)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None, "not started"
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then wait; SIGKILL if it has not exited after 30 s (and raise). Returns
        the exit code (None if it never started)."""
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

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *details: object) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """`memserve serve ARGS...` on 127.0.0.1 with any free gRPC and metrics port."""

    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "memserve", "serve", "--port", "0"]
        super().__init__([*command, "--metrics-port", "0", *args], log_dir, env=env)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

"""What the client tests share: a real server with ntm-copy and the small VMED of
tests/tiny_vmed.py, how served outputs compare with the in-process reference (bit for bit),
channel options that skip any proxy, and client subprocesses whose output a test can wait
for."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType

import numpy as np
import pytest

from bench.child_server import ServerProcess
from kernels.backend import BACKEND_ENV
from tests.tiny_vmed import tiny_vmed

ROOT = Path(__file__).resolve().parents[2]
TINY = "vmed-tiny"  # the small VMED: replies always run to max_tokens
LIMIT = 120  # --max-new-tokens of the test servers
MAX_STEPS = 256  # --max-steps-per-call of the test servers
DIRECT = [("grpc.enable_http_proxy", 0)]  # straight to loopback, whatever http_proxy says


@contextmanager
def served(
    tmp_path_factory: pytest.TempPathFactory, *models: str, args: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    """A server of ntm-copy, the small VMED (as TINY) and `models`."""
    directory, _ = tiny_vmed(tmp_path_factory.mktemp("model") / TINY)
    with ServerProcess(
        tmp_path_factory.mktemp("server"),
        "--models", ",".join(["ntm-copy", str(directory), *models]),
        "--max-new-tokens", str(LIMIT), "--max-steps-per-call", str(MAX_STEPS), *args,
    ) as process:  # fmt: skip
        yield process


@contextmanager
def torch_backend() -> Iterator[None]:
    """Step in-process references on the PyTorch backend, as the servers do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


def same_bits(served: np.ndarray, expected: np.ndarray) -> bool:
    """Whether served outputs are the in-process reference's, bit for bit: the server is
    batch-invariant (docs/serving.md, "Guarantees"), so a session's outputs do not depend
    on what else shares its launches."""
    return (
        served.shape == expected.shape
        and served.dtype == expected.dtype
        and np.array_equal(served, expected)
    )


def subprocess_env() -> dict[str, str]:
    """The environment of a client subprocess: no proxy for loopback, no interpreter."""
    proxies = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}
    return {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in proxies and name != "TRITON_INTERPRET"
    }


class Watched:
    """A command run in ROOT with `subprocess_env()`, its stdout and stderr collected by
    threads as they arrive, so that a test can wait (with a deadline) for what it prints
    without blocking on a pipe; its stdin stays open for `send` until `finish`. Killed at
    the end of its `with` block."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=subprocess_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.output = {"stdout": bytearray(), "stderr": bytearray()}
        self.lock = threading.Lock()
        self.readers = [
            threading.Thread(target=self._collect, args=(name,), daemon=True)
            for name in self.output
        ]
        for reader in self.readers:
            reader.start()

    def _collect(self, name: str) -> None:
        stream = getattr(self.process, name)
        while chunk := os.read(stream.fileno(), 4096):
            with self.lock:
                self.output[name] += chunk

    def text(self, name: str = "stdout") -> str:
        with self.lock:
            return self.output[name].decode(errors="replace")

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        """Return once `condition()` holds; fail at the deadline, or when the process has
        ended and all it printed has been read without the condition holding."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self._drain()
                if condition():
                    return
                raise AssertionError(f"the process ended ({self.process.returncode}) first: "
                                     f"{self.text()!r} {self.text('stderr')!r}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout} s in vain: {self.text()!r} "
                                     f"{self.text('stderr')!r}")  # fmt: skip
            time.sleep(0.01)

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the process has ended and its output has all been read."""
        code = self.process.wait(timeout)
        self._drain()
        return code

    def finish(self, timeout: float = 60) -> int:
        """Close stdin (the end of the input), then `wait`."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.wait(timeout)

    def _drain(self) -> None:
        for reader in self.readers:
            reader.join(10)

    def __enter__(self) -> Watched:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.process.kill()
        self.process.wait(30)
        self._drain()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class Relay:
    """A TCP relay on a loopback port that stays, to a server that may not: what a client
    given `target` reaches is whichever server the test `point`s it at (a load balancer in
    front of a server that is killed and started again on another port). While it points
    nowhere (`point(None)`), new connections wait, accepted, for a server; connections to
    a server that dies are closed, as the server's own would be."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.backend: int | None = None
        self.condition = threading.Condition()
        self.closed = False
        self.connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def point(self, port: int | None) -> None:
        """Relay new connections to the server on `port` (None: make them wait)."""
        with self.condition:
            self.backend = port
            self.condition.notify_all()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.backend is not None or self.closed)
            port = self.backend
            if self.closed or port is None:
                client.close()
                return
        try:
            server = socket.create_connection(("127.0.0.1", port))
        except OSError:  # the server died meanwhile: as if it had refused
            client.close()
            return
        with self.condition:
            self.connections.update((client, server))
        back = threading.Thread(target=self._pump, args=(server, client), daemon=True)
        back.start()
        self._pump(client, server)
        back.join()
        with self.condition:
            self.connections.difference_update((client, server))
        client.close()
        server.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one direction until it ends; then end both (a connection is all or none)."""
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with suppress(OSError):  # already shut
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
            connections = list(self.connections)
        self.listener.close()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *details: object) -> None:
        self.close()

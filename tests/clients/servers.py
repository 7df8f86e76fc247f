"""What the client tests share: a real server with ntm-copy and the small VMED of
tests/tiny_vmed.py (`served`; `Durable`: on a store that outlives it, behind a `Relay`, to
kill with SIGKILL and start again), how served outputs compare with the in-process reference
(bit for bit), channel options that skip any proxy, and client subprocesses whose output a
test can wait for."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import pytest

from bench.child_server import ServerProcess
from clients.loadgen.server_metrics import scrape
from kernels.backend import BACKEND_ENV
from protos import memserve_pb2
from tests.tiny_vmed import tiny_vmed

if TYPE_CHECKING:
    from bench.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TINY = "vmed-tiny"  # the small VMED: replies always run to max_tokens
LIMIT = 120  # --max-new-tokens of the test servers
MAX_STEPS = 256  # --max-steps-per-call of the test servers
DIRECT = [("grpc.enable_http_proxy", 0)]  # straight to loopback, whatever http_proxy says
# The server on a durable store (`Durable`):
LONG = 1000  # its --max-steps-per-call: a Step of LONG steps is seconds of work, to cut mid-way
REPLY = 1000  # its --max-new-tokens (the small VMED always runs to max_tokens)
WAIT_SECONDS = 120.0  # the most a test waits for what it waits for (only a failing one)
REQUESTS = "memserve_request_duration_seconds_count"  # the server's count of calls


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


def server_counts(server: ServerProcess) -> dict[tuple[str, str], float]:
    """The server's answered calls so far by (method, code)."""
    return {
        (dict(labels)["method"], dict(labels)["code"]): value
        for (name, labels), value in scrape(server.metrics_url).items()
        if name == REQUESTS
    }


Counts = dict[str, dict[str, int]]  # calls by method and status code, as loadgen's JSON has them


def counts_between(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    leave_out: Collection[str] = (),
) -> Counts:
    """The calls counted between two `server_counts`, but those of the methods `leave_out`."""
    counted: Counts = {}
    for (method, code), value in after.items():
        delta = round(value - before.get((method, code), 0.0))
        if delta and method not in leave_out:
            counted.setdefault(method, {})[code] = delta
    return counted


def settled_counts(
    server: ServerProcess,
    before: dict[tuple[str, str], float],
    sent: Counts | Callable[[Counts], bool],
    leave_out: Collection[str] = (),
) -> Counts:
    """What the server counted since `before` (but `leave_out`), read again for a moment
    while it differs from `sent`, or while `sent(counted)` does not hold where the count
    to expect is not one number (a streamed call is counted just after its last message
    leaves)."""
    done = sent if callable(sent) else (lambda counted: counted == sent)
    deadline = time.monotonic() + 60
    while True:
        counted = counts_between(before, server_counts(server), leave_out)
        if done(counted) or time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


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
    nowhere (`point(None)`), new connections wait, accepted, for a server, or (`refuse`)
    are closed at once, as where nothing listens; connections to a server that dies are
    closed, as the server's own would be."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.backend: int | None = None
        self.refusing = False
        self.condition = threading.Condition()
        self.closed = False
        self.connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def point(self, port: int | None, refuse: bool = False) -> None:
        """Relay new connections to the server on `port` (None: make them wait, or with
        `refuse` close them)."""
        with self.condition:
            self.backend = port
            self.refusing = refuse and port is None
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
            self.condition.wait_for(
                lambda: self.backend is not None or self.closed or self.refusing
            )
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


class Durable:
    """memserve (ntm-copy and the small VMED) on a store that outlives it, behind a relay:
    `restart` kills it with SIGKILL and starts another on the same store."""

    def __init__(
        self, tmp_path_factory: pytest.TempPathFactory, store: str, redis: RedisServer | None
    ) -> None:
        self.redis = redis  # the store's redis-server, if it is one
        model, _ = tiny_vmed(tmp_path_factory.mktemp("model") / TINY)
        self.logs = tmp_path_factory.mktemp("server")
        self.args = (
            "--models", f"ntm-copy,{model}", "--store", store, "--durability", "launch",
            "--max-steps-per-call", str(LONG), "--max-new-tokens", str(REPLY),
        )  # fmt: skip
        self.relay = Relay()
        self.server = self._start()
        self.restarts = 0

    def _start(self) -> ServerProcess:
        server = ServerProcess(self.logs, *self.args)
        server.start()
        self.relay.point(server.port)
        return server

    def restart(self, session_id: str | None, committed: int = 0, refuse: bool = False) -> None:
        """kill -9, then a new server on the same store; the relay holds new connections
        in between, or with `refuse` closes them at once, as a restart in place does (its
        port has no listener until the new server is up), so that attempts fail fast.
        Calls in flight through the relay fail with UNAVAILABLE, as the server's own
        connections would. Before the relay lets clients reach the new server, check that
        the session's step count there, what the store had, is `committed`: the call cut
        short was indeed not committed before the kill (else it was not cut at all). A
        caller that cannot name the session (None) proves the cut otherwise."""
        self.relay.point(None, refuse)
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.wait(WAIT_SECONDS)
        self.server.stop()  # closes its channels
        self.server = ServerProcess(self.logs, *self.args)
        self.server.start()
        if session_id is not None:
            found = self.steps_of(session_id)
            assert found == committed, f"the call was committed ({found} steps) before the kill"
        self.relay.point(self.server.port)
        self.restarts += 1

    def steps_of(self, session_id: str) -> int:
        """The session's step count as the server has it now (steps taken, committed or
        not)."""
        request = memserve_pb2.GetSessionRequest(session_id=session_id)
        return int(self.server.stub().GetSession(request, timeout=WAIT_SECONDS).step)

    def wait_for_steps(self, session_id: str, above: int, below: int) -> int:
        """Wait until the session's step count is past `above`, and return it: it must be
        under `below` (the call has started, and has not finished)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while (steps := self.steps_of(session_id)) <= above:
            assert time.monotonic() < deadline, "the call never started"
        assert steps < below, f"the call ended ({steps} steps) before it could be cut"
        return steps

    def stop(self) -> None:
        self.server.stop()
        self.relay.close()

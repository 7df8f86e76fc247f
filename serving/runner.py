"""A model and its state pool in a process of their own, driven over a pipe.

Why a process: a launch is a few hundred small torch calls, and every one of them gives up
the GIL and must win it back. In the server's process the event loop, busy with gRPC, wins
it first for up to `sys.getswitchinterval()` each time: measured on a 2-core CPU, a 0.7 ms
step took 15-900 ms beside a busy Python thread. In its own process the step has its own
interpreter, and the server process only sends the launch's arrays and reads the answer
when it comes. This is how vLLM's engine core runs too.

The protocol is one request and one answer at a time on a `multiprocessing` pipe: an
operation name and its arguments (numpy arrays, plain values), answered `(True, value)` or
`(False, exception)`, in the order sent. Every call is made on the server's event loop
thread. Launches are submitted without waiting (so the next one can be queued while one
computes) and their answers read when the pipe's descriptor becomes readable
(`loop.add_reader`): the loop serves RPCs meanwhile without a thread in between (a worker
thread would have to win the GIL back from the busy loop to hand over every answer). The
other operations (read, write) are short and block the loop. The child loads the
checkpoint itself on the server's device, so weights and pool never cross the pipe;
session states cross it as numpy arrays only when a session is created, forked, parked,
restored, exported or imported.

The child ignores SIGINT and SIGTERM: the server drains first and then closes the pipe,
and the child exits when the pipe closes, also when the server is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from serving.errors import Unavailable
from serving.generation import sample_tokens

START_SECONDS = 120.0  # loading a checkpoint and importing torch in the child
STOP_SECONDS = 10.0


class RunnerError(Unavailable):
    """The model's process is gone, or did not start: this server cannot serve the model."""


class PoolRunner:
    """The server's side: starts the child and calls its operations, one at a time."""

    def __init__(
        self, directory: Path, device: str, slots: int, threads: int, nice: int = 0
    ) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=serve,
            args=(child, str(directory), device, slots, threads, nice),
            name=f"memserve-model-{directory.name}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.backend = ""
        self.pending: deque[asyncio.Future[Any]] = deque()  # launches sent, oldest first

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def wait_ready(self) -> None:
        """Block until the child has loaded the model and allocated the pool."""
        if not self.connection.poll(START_SECONDS):
            raise RunnerError(f"the model process did not start within {START_SECONDS:g} s")
        self.backend = cast(str, self._answer())

    def call(self, operation: str, *arguments: Any) -> Any:
        """Run one operation in the child and return its answer (raising what it raised).

        Blocks. Launches still in flight run first (the pipe keeps order); their answers
        are read on the way and resolve their futures."""
        self._send(operation, arguments)
        while self.pending:
            self._read_answer()
        return self._answer()

    def _send(self, operation: str, arguments: tuple[Any, ...]) -> None:
        try:
            self.connection.send((operation, arguments))
        except (OSError, ValueError) as error:
            raise self._gone() from error

    def _answer(self) -> Any:
        try:
            ok, value = self.connection.recv()
        except (EOFError, OSError) as error:
            raise self._gone() from error
        if not ok:
            raise value
        return value

    def _gone(self) -> RunnerError:
        self.process.join(timeout=1.0)
        return RunnerError(
            f"the model process {self.process.name} exited (exit code {self.process.exitcode})"
        )

    # The operations, typed.

    def submit(
        self, launches: dict[str, tuple[np.ndarray, ...]]
    ) -> asyncio.Future[tuple[dict[str, Any], float]]:
        """Send one iteration's launches (see `run_launches`) and return at once: a future of
        the host outputs and seconds taken, resolved on the event loop when the answer
        arrives (or with RunnerError if the child dies). Launches run in the order sent,
        so the next one can be queued while one computes."""
        self._send("launch", (launches,))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[dict[str, Any], float]] = loop.create_future()
        self.pending.append(answer)
        if len(self.pending) == 1:
            loop.add_reader(self.connection.fileno(), self._read_answer)
        return answer

    def wait(self, answer: asyncio.Future[Any]) -> Any:
        """Block until a submitted launch's answer is in; its outputs (or raise its error)."""
        while not answer.done():
            self._read_answer()
        return answer.result()

    def _read_answer(self) -> None:
        """Read the oldest launch's answer into its future (dropped if its caller left)."""
        answer = self.pending.popleft()
        if not self.pending:
            asyncio.get_running_loop().remove_reader(self.connection.fileno())
        try:
            value = self._answer()
        except Exception as error:
            if not answer.done():
                answer.set_exception(error)
        else:
            if not answer.done():
                answer.set_result(value)

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """A host copy of one slot's state."""
        arrays = cast(dict[str, np.ndarray], self.call("read", slot))
        return {name: torch.from_numpy(array) for name, array in arrays.items()}

    def write(self, slot: int, state: Mapping[str, torch.Tensor]) -> None:
        """Put a whole state into a slot (validated there; a bad one changes nothing)."""
        self.call("write", slot, {name: t.detach().cpu().numpy() for name, t in state.items()})

    def close(self) -> None:
        """Stop the child: ask, then wait, then terminate. Launches still in flight are
        answered RunnerError."""
        if self.pending:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.connection.fileno())
            for answer in self.pending:
                if not answer.done():
                    answer.set_exception(RunnerError("the model process was stopped"))
            self.pending.clear()
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(("close", ()))
        self.connection.close()
        self.process.join(timeout=STOP_SECONDS)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=STOP_SECONDS)


def run_launches(
    model: Any, pool: Any, launches: dict[str, tuple[np.ndarray, ...]]
) -> tuple[dict[str, Any], float]:
    """One iteration's launches, one per kind of operation that some session needs: `step`
    (any model), `encode`, `begin` and `decode` (text models; the next tokens, sampled here
    from the logits, so that only B token ids cross the pipe); host outputs and seconds."""
    start = time.perf_counter()
    device = pool.device
    results: dict[str, Any] = {}
    for kind, arrays in launches.items():
        # decode's last four arrays are sampling settings, used here on the host
        on_device = arrays[:2] if kind == "decode" else arrays
        slots, *inputs = (torch.from_numpy(a).to(device) for a in on_device)
        if kind == "step":
            results[kind] = model.step(pool, slots, inputs[0]).cpu().numpy()
        elif kind == "encode":
            model.encode(pool, slots, inputs[0])
        elif kind == "begin":
            model.begin_reply(pool, slots, inputs[0], inputs[1])
        elif kind == "decode":
            logits = model.decode(pool, slots, inputs[0]).cpu().numpy()
            results[kind] = sample_tokens(logits, *arrays[2:])
        else:
            raise ValueError(f"unknown operation {kind!r}")
    return results, time.perf_counter() - start


def serve(
    connection: Connection, directory: str, device: str, slots: int, threads: int, nice: int
) -> None:
    """The child: load the model, allocate the pool, answer operations until told to stop.

    It runs `nice` steps below the server. On a CPU with fewer cores than busy processes
    the server's event loop, which turns RPCs into launches, is what limits throughput; at
    equal priority the model takes the core from it for every launch. Measured with 128
    concurrent unary Step callers on 2 cores (ntm-copy, four alternating pairs of runs):
    nice 10 gave 1.3x the calls/s of nice 0 at twice the batch; with a stream per session
    or 32 callers, no difference beyond the noise."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    from kernels.backend import retain_freed_memory, select_backend
    from models import checkpoint

    retain_freed_memory()
    try:
        if threads:
            torch.set_num_threads(threads)
        model = checkpoint.load(directory, device)
        pool = model.new_pool(slots)
        backend = select_backend(pool.device)
    except BaseException as error:  # said to the server, which refuses to start
        connection.send((False, _portable(error)))
        return
    connection.send((True, backend))

    def read(slot: int) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in pool.read(slot).items()}

    def write(slot: int, state: dict[str, np.ndarray]) -> None:
        pool.write(slot, {name: torch.from_numpy(a).to(pool.device) for name, a in state.items()})

    operations: dict[str, Callable[..., Any]] = {
        "launch": lambda launches: run_launches(model, pool, launches),
        "read": read,
        "write": write,
    }
    with torch.inference_mode():
        while True:
            try:
                operation, arguments = connection.recv()
            except (EOFError, OSError):  # the server is gone
                return
            if operation == "close":
                return
            try:
                answer: tuple[bool, Any] = (True, operations[operation](*arguments))
            except Exception as error:
                answer = (False, _portable(error))
            connection.send(answer)


def _portable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError saying it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error

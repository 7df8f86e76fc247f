"""The server's side of a model's process: start the worker (`serving.worker`), send it
requests and await their replies.

Every request is sent at once and returns a future; the worker answers in the order sent,
and the answers are read when the pipe's descriptor becomes readable (`loop.add_reader`),
so the event loop serves RPCs while the model computes, with no thread in between (a thread
would have to win the GIL back from the busy loop to hand over every answer). Launches are
pipelined this way, and a slot operation sent behind them runs after them: the pipe's order
is the pool's order. All calls are made on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast

import torch

from serving.errors import Unavailable
from serving.protocol import (
    Close,
    CopySlot,
    HostState,
    Landed,
    Launch,
    ModelCard,
    ReadSlot,
    Reply,
    Request,
    ResetSlot,
    WriteSlot,
)
from serving.worker import host_state
from serving.worker_process import STOP_SECONDS, WorkerProcess

START_SECONDS = 120.0  # importing torch and loading a checkpoint in the worker

State = dict[str, torch.Tensor]


class WorkerGone(Unavailable):
    """The model's process is gone, or did not start: this server cannot serve the model."""


class WorkerClient:
    """Sends a started worker (`serving.worker_process`) requests, answered in order."""

    def __init__(self, started: WorkerProcess) -> None:
        self.directory = started.directory
        self.process = started.process
        self.connection = started.connection
        self.waiting: deque[asyncio.Future[Any]] = deque()  # sent, not answered, oldest first

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def wait_ready(self) -> ModelCard:
        """Block until the worker has loaded the model and allocated the pool; its card."""
        if not self.connection.poll(START_SECONDS):
            raise WorkerGone(f"the model process did not start within {START_SECONDS:g} s")
        return cast(ModelCard, self._receive())

    # ------------------------------------------------------------------ requests

    def send(self, request: Request) -> asyncio.Future[Any]:
        """Send a request now; the future resolves with its answer (or the error it raised,
        or WorkerGone) when the worker gets to it."""
        try:
            self.connection.send(request)
        except (OSError, ValueError) as error:
            raise self._gone() from error
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(answer)
        if len(self.waiting) == 1:
            loop.add_reader(self.connection.fileno(), self._read_answer)
        return answer

    def launch(self, launch: Launch) -> asyncio.Future[Landed]:
        return self.send(launch)

    async def reset(self, slot: int) -> None:
        await self.send(ResetSlot(slot))

    async def copy(self, source: int, destination: int) -> None:
        await self.send(CopySlot(source, destination))

    async def read(self, slot: int) -> State:
        """A host copy of one slot's state."""
        arrays: HostState = await self.send(ReadSlot(slot))
        return {name: torch.from_numpy(array) for name, array in arrays.items()}

    async def write(self, slot: int, state: State) -> None:
        """Put a whole state into a slot (validated there; a bad one changes nothing)."""
        await self.send(WriteSlot(slot, host_state(state)))

    # ------------------------------------------------------------------ the pipe

    def _read_answer(self) -> None:
        """Read the oldest request's answer into its future (dropped if its caller left)."""
        answer = self.waiting.popleft()
        if not self.waiting:
            asyncio.get_running_loop().remove_reader(self.connection.fileno())
        try:
            value = self._receive()
        except Exception as error:
            if not answer.done():
                answer.set_exception(error)
            if isinstance(error, WorkerGone):
                self._fail_waiting(error)
        else:
            if not answer.done():
                answer.set_result(value)

    def _receive(self) -> Any:
        try:
            reply: Reply = self.connection.recv()
        except (EOFError, OSError) as error:
            raise self._gone() from error
        if not reply.ok:
            raise reply.value
        return reply.value

    def _gone(self) -> WorkerGone:
        self.process.join(timeout=1.0)
        return WorkerGone(
            f"the model process {self.process.name} exited (exit code {self.process.exitcode})"
        )

    def _fail_waiting(self, error: Exception) -> None:
        if self.waiting:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.connection.fileno())
        while self.waiting:
            answer = self.waiting.popleft()
            if not answer.done():
                answer.set_exception(error)

    def close(self) -> None:
        """Stop the worker: ask, then wait, then kill it (it ignores SIGTERM, which is the
        server's to drain on). Requests still waiting are answered WorkerGone."""
        self._fail_waiting(WorkerGone("the model process was stopped"))
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(Close())
        self.connection.close()
        self.process.join(timeout=STOP_SECONDS)
        if self.process.is_alive():
            self.kill()

    def kill(self) -> None:
        """Stop a worker that does not answer, at once (SIGKILL). Requests still waiting are
        answered WorkerGone."""
        self._fail_waiting(WorkerGone("the model process did not answer and was killed"))
        self.process.kill()
        self.process.join(timeout=STOP_SECONDS)

"""The server's side of a model's process: start the worker (`serving.worker`), send it
requests and await their replies.

Every request is sent at once and returns a future; the worker answers in the order sent,
and the answers are read when the pipe's descriptor becomes readable (`loop.add_reader`),
so the event loop serves RPCs while the model computes, with no thread in between (a thread
would have to win the GIL back from the busy loop to hand over every answer). Launches are
pipelined this way, and a slot operation sent behind them runs after them: the pipe's order
is the pool's order. All calls are made on the event loop's thread.

Requests are written without blocking (`socket.MSG_DONTWAIT`; what the socket's buffer
cannot take yet waits for `loop.add_writer`): the worker reads the next request only once
it has answered the last, so a blocking write of a large launch (restored states) would hold
the event loop, RPCs, health and signals included, for as long as the model computes, or
for ever if its process hangs.

A process that takes longer than `answer_timeout` over the request it is working on (the
oldest unanswered: a launch, a replay, a slot read or write) is stuck (a hung device, a
deadlock): it is killed, every waiting request fails with WorkerGone, and the engine's
failure path takes over (the server drains and exits 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
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
    Replay,
    Reply,
    Request,
    ResetSlot,
    StepBatch,
    WriteSlot,
    frame,
)
from serving.worker import host_state
from serving.worker_process import STOP_SECONDS, WorkerProcess

log = logging.getLogger("memserve.worker")

START_SECONDS = 120.0  # importing torch, loading a checkpoint and the warm-up, in the worker
# A timer that fires this much later than due means the server itself was not running (a
# paused container, a stopped process group, a starved machine): its worker had no time
# either, so the request's clock starts again rather than killing a healthy process.
LATE_SECONDS = 1.0

State = dict[str, torch.Tensor]


class WorkerGone(Unavailable):
    """The model's process is gone, or did not start: this server cannot serve the model."""


class WorkerClient:
    """Sends a started worker (`serving.worker_process`) requests, answered in order."""

    def __init__(self, started: WorkerProcess, answer_timeout: float = 30.0) -> None:
        self.directory = started.directory
        self.process = started.process
        self.connection = started.connection
        self.answer_timeout = answer_timeout
        # Sent, not answered, oldest first: each answer's future and its request.
        self.waiting: deque[tuple[asyncio.Future[Any], Request]] = deque()
        self.killed = False
        # The same socket, for writes that never block (a descriptor of its own).
        self._socket = socket.socket(fileno=os.dup(self.connection.fileno()))
        self._outgoing = bytearray()  # framed requests the socket could not take yet
        self._head_since = 0.0  # when the worker began the oldest waiting request
        self._watch: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self.killed and self.process.is_alive()

    def wait_ready(self) -> ModelCard:
        """Block until the worker has loaded the model and allocated the pool; its card."""
        if not self.connection.poll(START_SECONDS):
            raise WorkerGone(f"the model process did not start within {START_SECONDS:g} s")
        return cast(ModelCard, self._receive())

    # ------------------------------------------------------------------ requests

    def send(self, request: Request) -> asyncio.Future[Any]:
        """Send a request now; the future resolves with its answer (or the error it raised,
        or WorkerGone) when the worker gets to it."""
        if self.killed:
            raise WorkerGone("the model process was killed: it stopped answering")
        try:
            self._write(frame(request))
        except OSError as error:
            raise self._gone() from error
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((answer, request))
        if len(self.waiting) == 1:
            loop.add_reader(self.connection.fileno(), self._read_answer)
            self._head_since = loop.time()
            if self._watch is None:
                self._watch = loop.call_later(self.answer_timeout, self._check_head)
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

    def _write(self, parts: tuple[bytes, bytes]) -> None:
        """Write a framed request, or as much as the socket takes now, in order."""
        if self._outgoing:
            self._outgoing += parts[0]
            self._outgoing += parts[1]
            return
        try:
            sent = self._socket.sendmsg(parts, [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(parts[0]) + len(parts[1]):
            self._outgoing += b"".join(parts)[sent:]
            asyncio.get_running_loop().add_writer(self._socket.fileno(), self._flush)

    def _flush(self) -> None:
        """Write what waits, as the socket takes it (the loop calls this when it can)."""
        try:
            sent = self._socket.send(self._outgoing, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._stop_writing()
            self._fail_waiting(self._gone())
            return
        del self._outgoing[:sent]
        if not self._outgoing:
            self._stop_writing()

    def _stop_writing(self) -> None:
        self._outgoing.clear()
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            asyncio.get_running_loop().remove_writer(self._socket.fileno())

    def _read_answer(self) -> None:
        """Read the oldest request's answer into its future (dropped if its caller left)."""
        answer, _ = self.waiting.popleft()
        loop = asyncio.get_running_loop()
        if self.waiting:
            self._head_since = loop.time()  # the worker goes on to the next one now
        else:
            loop.remove_reader(self.connection.fileno())
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

    def _check_head(self) -> None:
        """The watchdog: kill a worker that has spent `answer_timeout` on one request."""
        loop = asyncio.get_running_loop()
        due, self._watch = self._head_since + self.answer_timeout, None
        if not self.waiting or self.killed:
            return
        now = loop.time()
        if now - due > LATE_SECONDS:  # the server itself was stopped: start the clock again
            self._head_since = now
        elif now < due:  # answers came in since the timer was set: wait for the new head
            self._watch = loop.call_at(due, self._check_head)
            return
        else:
            request = describe_request(self.waiting[0][1])
            log.error(
                "the model process took more than %g s over one request (%s): killed; if it "
                "is slow rather than stuck, raise --model-timeout or make that request "
                "smaller (--max-batch, --steps-per-launch; --snapshot-every for a replay)",
                self.answer_timeout, request,
                extra={
                    "event": "model_process_stuck", "model": self.directory.name,
                    "request": request,
                },
            )  # fmt: skip
            self.kill()
            return
        self._watch = loop.call_at(now + self.answer_timeout, self._check_head)

    def _receive(self) -> Any:
        try:
            reply: Reply = self.connection.recv()
        except (EOFError, OSError) as error:
            raise self._gone() from error
        if not reply.ok:
            raise reply.value
        return reply.value

    def _gone(self) -> WorkerGone:
        if self.killed:
            return WorkerGone("the model process was killed: it stopped answering")
        self.process.join(timeout=1.0)
        return WorkerGone(
            f"the model process {self.process.name} exited (exit code {self.process.exitcode})"
        )

    def _fail_waiting(self, error: Exception) -> None:
        if self.waiting:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.connection.fileno())
        while self.waiting:
            answer, _ = self.waiting.popleft()
            if not answer.done():
                answer.set_exception(error)

    def close(self) -> None:
        """Stop the worker: ask, then wait, then kill it (it ignores SIGTERM, which is the
        server's to drain on). Requests still waiting are answered WorkerGone."""
        self._fail_waiting(WorkerGone("the model process was stopped"))
        if self._watch is not None:
            self._watch.cancel()
        if not self.killed and not self._outgoing:  # else it would read a torn request
            with contextlib.suppress(OSError):
                self._socket.sendmsg(frame(Close()), [], socket.MSG_DONTWAIT)
        self._stop_writing()
        self._socket.close()
        self.connection.close()
        self.process.join(timeout=STOP_SECONDS)
        if self.process.is_alive():
            self.kill()
            self.process.join(timeout=STOP_SECONDS)

    def kill(self) -> None:
        """Stop a worker that does not answer, at once (SIGKILL; `close` reaps it). Requests
        still waiting, and any sent later, are answered WorkerGone."""
        self.killed = True
        self._fail_waiting(WorkerGone("the model process did not answer and was killed"))
        self._stop_writing()
        self.process.kill()


def describe_request(request: Request) -> str:
    """What a request asked of the model's process, in a few words (the watchdog's log)."""
    if isinstance(request, Launch):
        rows = sum(len(batch.slots) for batch in request.batches)
        steps = max(
            (
                int(b.steps.max())
                for b in request.batches
                if isinstance(b, StepBatch) and len(b.slots)
            ),
            default=1,
        )
        rows_text = f"{rows} row{'s' * (rows != 1)}"
        steps_text = f"{steps} step{'s' * (steps != 1)}"
        moves = f"{len(request.restore)} states written in, {len(request.park)} read out"
        return f"a launch of {rows_text}, up to {steps_text} each; {moves}"
    if isinstance(request, Replay):
        return f"bringing a stored session back: {len(request.rows)} operations"
    return f"a slot operation ({type(request).__name__})"

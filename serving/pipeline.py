"""The launches in flight to a model's process: assemble one from the scheduler's rows and
the slot moves, send it, and land its answer when it comes.

Up to MAX_FLIGHTS launches are in flight at once: while the model computes one, the next
waits in the pipe and the event loop delivers the last one's outputs and takes RPCs. The
worker runs them in the order sent, so landing them in that order keeps every session's step
count in step with its state. Whoever reads or rewrites a session outside a launch (fork,
export) first lands every launch in flight (`land_all`), holding the engine's lock so that no
new one is sent meanwhile.

With `--durability launch` a landed launch's calls are answered once their commit is
written, and until then launches carry only calls already started: the calls that arrive
meanwhile gather into one launch. Sent at once, they would go out a few at a time, each
launch costing the event loop about as much as a full one (docs/performance.md,
"Durability").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from serving.generation import GenerateCall
from serving.metrics import Metrics
from serving.protocol import Landed, Launch, Operation, batch_of
from serving.scheduler import Row, Scheduler
from serving.sessions import Session, SessionTable
from serving.slots import SlotManager, SlotMoves
from serving.worker_client import WorkerClient, WorkerGone

log = logging.getLogger("memserve.pipeline")

# One launch computing while the next waits in the pipe and the last is delivered; a third
# measured better than two, a fourth no better (docs/performance.md, "Launches in flight").
MAX_FLIGHTS = 3


@dataclass(eq=False)
class Flight:
    """A launch sent to the model's process, and what landing it needs."""

    rows: list[Row]
    groups: dict[Operation, list[int]]  # the rows of each operation's batch, in order
    parked: list[tuple[Session, int]]  # sessions whose state this launch reads out
    saved: list[tuple[GenerateCall, int]]  # turns whose state before they began it reads
    answer: asyncio.Future[Landed]


def assemble(rows: list[Row], moves: SlotMoves) -> tuple[Launch, dict[Operation, list[int]]]:
    """The launch for these rows: one batch per operation (int64 slots, then each row's
    argument stacked, the rows of most steps first), with the slot moves to run before them."""
    groups: dict[Operation, list[int]] = {}
    for index in sorted(range(len(rows)), key=lambda i: -rows[i].steps):  # stable
        groups.setdefault(rows[index].operation, []).append(index)
    batches = []
    for operation, indices in groups.items():
        slots = np.array([rows[i].call.session.slot for i in indices], np.int64)
        batches.append(batch_of(operation, slots, [rows[i].argument for i in indices]))
    park = tuple(slot for _, slot in moves.park)
    save = tuple(slot for _, slot in moves.save)
    return Launch(tuple(batches), park, tuple(moves.restore), save), groups


def _land_only(land: Callable[[], None]) -> None:
    land()


class Pipeline:
    """The launches of one model in flight, oldest first."""

    def __init__(
        self,
        name: str,
        backend: str,
        worker: WorkerClient,
        scheduler: Scheduler,
        slots: SlotManager,
        table: SessionTable,
        metrics: Metrics,
        lose: Callable[[Session, Exception], None],
        on_failure: Callable[[WorkerGone], None],
    ) -> None:
        self.name = name
        self.worker = worker
        self.scheduler = scheduler
        self.slots = slots
        self.table = table
        self.lose = lose  # a session whose state a failed launch took with it
        self.on_failure = on_failure  # the model's process is gone
        self.flights: deque[Flight] = deque()
        # Lands a launch (the callable given) and commits the calls it finished, returning
        # the commit's future when their answers wait for it (`--durability launch`), else
        # None (`Answers.landing`). Until it is written no launch starts a call
        # (`may_start`): the calls that arrive meanwhile gather into one launch instead of
        # going out a few at a time.
        self.landing: Callable[[Callable[[], None]], asyncio.Future[Any] | None] = _land_only
        self.unanswered = 0  # landed launches whose calls wait on their commit
        self.on_written: Callable[[], None] = lambda: None  # a commit waited on is written
        self.observe_batch = metrics.batch_size.labels(name).observe
        self.observe_step = metrics.step_duration.labels(name, backend).observe

    def has_room(self) -> bool:
        return len(self.flights) < MAX_FLIGHTS

    def may_start(self) -> bool:
        """Whether a launch may start calls: not while a landed launch's calls wait for
        their commit (calls already started go on meanwhile). The wait ends: a started
        call finishes within ceil(T / steps_per_launch) launches (a turn within its
        tokens), and once none is left no launch lands and the commits in flight land."""
        return not self.unanswered

    def send(self, rows: list[Row], moves: SlotMoves) -> bool:
        """Send the launch of `rows` and `moves`; False if there is nothing to send or the
        model's process is gone."""
        if not rows and not moves:
            return False
        launch, groups = assemble(rows, moves)
        try:
            answer = self.worker.launch(launch)
        except WorkerGone as error:
            self._lose(rows, moves.park, error)
            self.on_failure(error)
            return False
        self.flights.append(Flight(rows, groups, moves.park, moves.save, answer))
        return True

    async def land_oldest(self, lock: asyncio.Lock) -> None:
        """Wait for the oldest launch's answer, then land it under `lock` (unless someone
        holding the lock landed it first)."""
        flight = self.flights[0]
        await asyncio.wait({flight.answer})
        async with lock:
            if self.flights and self.flights[0] is flight:
                self.flights.popleft()
                self._land(flight)

    async def land_all(self) -> None:
        """Land every launch in flight. The caller holds the engine's lock, so none is sent
        meanwhile; if the caller is cancelled, the answer stays for the batch loop."""
        while self.flights:
            flight = self.flights[0]
            await asyncio.wait({flight.answer})
            if self.flights and self.flights[0] is flight:
                self.flights.popleft()
                self._land(flight)

    def _land(self, flight: Flight) -> None:
        """Deliver a launch's answer: parked states to the store, outputs to their calls."""
        try:
            landed = flight.answer.result()
        except Exception as error:
            self._lose(flight.rows, flight.parked, error)
            if isinstance(error, WorkerGone):
                self.on_failure(error)
            return
        self.slots.landed(flight.parked, landed.parked)
        for (call, _), arrays in zip(flight.saved, landed.saved, strict=True):
            call.before = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if flight.rows:
            self.observe_batch(len(flight.rows))
            self.observe_step(landed.seconds)
        outputs: list[Any] = [None] * len(flight.rows)
        for operation, indices in flight.groups.items():
            result = landed.outputs.get(operation)
            if result is not None:
                for index, output in zip(indices, result, strict=True):
                    steps = flight.rows[index].steps  # a STEP row's outputs: one per step
                    outputs[index] = output[:steps] if operation is Operation.STEP else output
        written = self.landing(partial(self.scheduler.update_from_output, flight.rows, outputs))
        if written is not None:
            self.unanswered += 1
            written.add_done_callback(self._written)

    def _written(self, written: asyncio.Future[Any]) -> None:
        if not written.cancelled():
            written.exception()  # the calls' own futures report a failure
        self.unanswered -= 1
        self.on_written()

    def _lose(self, rows: list[Row], parked: list[tuple[Session, int]], error: Exception) -> None:
        """A launch failed: its slots may be half-written and the states it parked are gone,
        so those sessions do not go on from a state that no longer matches their count."""
        log.error(
            "batched step failed",
            exc_info=error,
            extra={"event": "step_failed", "model": self.name},
        )
        self.slots.lost(parked)
        sessions = [*self.scheduler.update_from_failure(rows), *(s for s, _ in parked)]
        for session in sessions:
            if self.table.live(session):
                self.lose(session, error)

"""One served model: its sessions, their slots and parking, and the loop that steps them in
batches.

Continuous batching: calls queue per session (one in flight per session, arrival order
kept). Each iteration the loop takes the head call of up to `max_batch` ready sessions in
round-robin order and advances each by ONE operation: a step (`model.step`), or for a
Generate call a token written, a reply begun or a token decoded; the sessions that need the
same operation share one launch. A call of T steps therefore takes T iterations, other
sessions interleave with it, and calls that arrive while a launch runs join the next one.

The model and its state pool live in a process of their own (`serving.runner`). Launches
are pipelined: up to MAX_FLIGHTS are in flight, so while the model computes one, the next
waits in the pipe and the event loop delivers the last one's outputs and takes RPCs. A
session takes part in a launch while it has a row in flight only with more rows of the
same Step call (their inputs are known); a Generate call waits for each token it samples.

Everything that touches the pool or the session bookkeeping (create, fork, import, export,
delete, park, restore, expire, and assembling or delivering a launch) holds `self.lock`, an
asyncio lock on the event loop thread. Reading or writing a slot outside a launch first
lands every launch in flight (`_settle`), so a session's state always matches its step
count when it is read, parked, restored or overwritten.

Slots: a new, forked, imported or restored session takes a free slot; if there is none the
least recently used idle session is parked (host memory, then disk, see `store`); if every
active session has work in flight, a new session starts parked and takes a slot when its
first step comes. RESOURCE_EXHAUSTED only when the parking store cannot take it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.base import MemoryModel
from models.state import validate_state
from serving.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
)
from serving.generation import GenerateWork, Sampling, prompt_tokens, text_model
from serving.metrics import Metrics
from serving.runner import PoolRunner, RunnerError
from serving.sessions import ImportedState, Session, SessionTable, export_state, new_session_id
from serving.store import ParkingStore
from serving.work import OPERATIONS, StepWork, Work

log = logging.getLogger("memserve.engine")


@dataclass(frozen=True)
class EngineSettings:
    """How one model is served (see `serving.config` for what each means)."""

    slots: int
    max_batch: int
    max_queue_delay: float  # seconds to wait for more sessions before a launch
    session_ttl: float
    max_session_ttl: float
    max_steps_per_call: int  # also the most tokens of a Generate call's text
    max_new_tokens: int  # the most tokens a Generate call may ask for


# Launches in flight at once: one computing in the model's process while the server
# delivers the last and assembles the next, which then wait their turn in the pipe. Three
# rather than two: with 256 streams (ntm-copy, 2 cores) 3 gave 5-13 % more messages/s than
# 2 in four of four alternating pairs, T=20 calls 0-5 % more in quiet pairs, 128 unary
# callers the same; 4 gave no more than 3.
MAX_FLIGHTS = 3


@dataclass(eq=False)
class Flight:
    """A launch sent to the model's process: its calls (one row each), the rows of each
    kind of operation, and the answer to come."""

    batch: list[Work]
    groups: dict[str, list[int]]
    answer: asyncio.Future[tuple[dict[str, Any], float]]


class ModelEngine:
    """The sessions of one model and the batch loop that steps them.

    `model` is the server's host copy of the model, for what it says of itself (sizes, state
    specs, tokenizer); `runner` holds the model that runs and the slots of its state pool.
    """

    def __init__(
        self,
        name: str,
        model: MemoryModel,
        runner: PoolRunner,
        model_digest: str,
        settings: EngineSettings,
        table: SessionTable,
        store: ParkingStore,
        metrics: Metrics,
    ) -> None:
        self.name = name
        self.model = model
        self.model_digest = model_digest
        self.settings = settings
        self.table = table
        self.store = store
        self.metrics = metrics
        self.runner = runner
        self.backend = runner.backend
        self.specs = {spec.name: spec for spec in model.state_specs()}
        self.free_slots = list(range(settings.slots - 1, -1, -1))  # pop() gives slot 0 first
        self.active: OrderedDict[str, Session] = OrderedDict()  # in slots, least recent first
        self.parked: dict[str, Session] = {}
        self.ready: OrderedDict[str, Session] = OrderedDict()  # with calls queued, round-robin
        self.queued_calls = 0
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.flights: deque[Flight] = deque()  # launches sent, not yet landed, oldest first
        self.tasks: list[asyncio.Task[None]] = []
        # Called when the model's process is gone; the server drains and exits non-zero.
        self.on_failure: Callable[[RunnerError], None] = lambda error: None
        self._register_gauges()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the batch loop and the expiry sweep (on the running event loop)."""
        self.tasks = [
            asyncio.create_task(self._batch_loop(), name=f"batch-{self.name}"),
            asyncio.create_task(self._expiry_loop(), name=f"expiry-{self.name}"),
        ]

    async def stop(self) -> None:
        """Stop the loops; calls still queued are answered CANCELLED."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in list(self.ready.values()):
            self._fail_pending(session, Cancelled("the server shut down before this step ran"))
        self.runner.close()

    # ----------------------------------------------------------------- sessions

    def info(self, session: Session) -> str:
        """Where a session's state is: "active", "parked_host" or "parked_disk"."""
        if session.slot is not None:
            return "active"
        return self.store.residence(session.id) or "parked_host"

    def check_ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.settings.session_ttl
        if not (np.isfinite(ttl) and 0 < ttl <= self.settings.max_session_ttl):
            raise InvalidArgument(
                f"ttl_seconds must be > 0 and <= {self.settings.max_session_ttl:g}, got {ttl}"
            )
        return ttl

    async def create(self, ttl: float | None, seed: int | None) -> Session:
        """A new session at step 0 in the model's initial state."""
        session = self._new_session(self.check_ttl(ttl), step=0, seed=seed)
        async with self.lock:
            await self._land_flights()
            self._place(session, self.model.initial_state())
        self._log_session("created", session, residence=self.info(session))
        return session

    async def fork(self, parent: Session, ttl: float | None) -> Session:
        """A new session holding a copy of `parent`'s state and step count."""
        ttl = self.check_ttl(ttl) if ttl is not None else parent.ttl
        async with self.lock:
            await self._land_flights()  # the parent's count must include its rows in flight
            self._check_live(parent)
            child = self._new_session(ttl, step=parent.step, seed=parent.seed)
            if parent.slot is not None:
                self._mark_used(parent)  # keep the parent out of the parking choice
            self._place(child, self._read_state(parent))
        self._log_session("forked", child, parent=parent.id)
        return child

    async def export(self, session: Session) -> tuple[bytes, int]:
        """The session's state as safetensors bytes, with its step count."""
        async with self.lock:
            await self._land_flights()  # the count must include the session's rows in flight
            self._check_live(session)
            state, step = self._read_state(session), session.step
        return export_state(state, self.name, self.model_digest, step), step

    async def import_(self, imported: ImportedState, ttl: float | None) -> Session:
        """A new session from what `export` returned (on this server or another)."""
        ttl = self.check_ttl(ttl)
        if imported.model_digest and imported.model_digest != self.model_digest:
            raise FailedPrecondition(
                f"state was exported from different weights of model {imported.model!r} "
                f"(digest {imported.model_digest[:12]}, this server has {self.model_digest[:12]})"
            )
        try:
            validate_state(self.model.state_specs(), imported.tensors)
        except ValueError as error:
            raise InvalidArgument(f"state does not fit model {self.name!r}: {error}") from error
        session = self._new_session(ttl, step=imported.step, seed=None)
        async with self.lock:
            await self._land_flights()
            self._place(session, imported.tensors)
        self._log_session("imported", session, step=session.step)
        return session

    async def delete(self, session: Session) -> None:
        """End a session; Step calls still queued for it are answered NOT_FOUND."""
        async with self.lock:
            self._check_live(session)
            self._end(session, "was deleted")
        self._log_session("deleted", session)

    # ----------------------------------------------------------------- stepping

    async def step(
        self, session: Session, inputs: np.ndarray, expected_step: int | None
    ) -> tuple[np.ndarray, int]:
        """Run the T steps of `inputs` `[T, input_size]` on the session, in the batch loop.

        Returns the outputs `[T, output_size]` and the step count after them. Cancelling the
        caller stops the call at the next iteration; the steps already taken stay.
        """
        work = StepWork(
            session=session,
            inputs=inputs,
            outputs=np.empty((inputs.shape[0], self.model.output_size), dtype=np.float32),
            expected_step=expected_step,
            future=asyncio.get_running_loop().create_future(),
            enqueued=time.perf_counter(),
        )
        self._enqueue(work)
        step = await work.future
        return work.outputs, step

    def generate(
        self, session: Session, text: str, sampling: Sampling, seed: int | None
    ) -> GenerateWork:
        """Queue a Generate call on the session; iterate `work.stream()` for the reply.

        Cancelling the caller stops the call at the next launch: what was written to memory
        by then stays (part of the user's text, or all of it), the reply is not written.
        """
        model = text_model(self.model, self.name)
        assert model.tokenizer is not None
        prompt = prompt_tokens(model.tokenizer, text, self.settings.max_steps_per_call)
        if seed is None:
            seed = session.seed
        work = GenerateWork(
            session=session,
            future=asyncio.get_running_loop().create_future(),
            enqueued=time.perf_counter(),
            prompt=prompt,
            sampling=sampling,
            rng=np.random.default_rng(seed),
            tokenizer=model.tokenizer,
            latent_size=self.specs["z"].shape[0],
        )
        self._enqueue(work)
        return work

    def _enqueue(self, work: Work) -> None:
        self._check_live(work.session)
        work.session.pending.append(work)
        self.queued_calls += 1
        if work.session.id not in self.ready:
            self.ready[work.session.id] = work.session
        self.wake.set()

    async def _batch_loop(self) -> None:
        delay = self.settings.max_queue_delay
        while True:
            if not self.flights:
                await self.wake.wait()
                if delay > 0 and len(self.ready) < self.settings.max_batch:
                    await asyncio.sleep(delay)  # let more sessions join this launch
            async with self.lock:
                self.wake.clear()
                while len(self.flights) < MAX_FLIGHTS and self._submit():
                    pass
                if not self.flights:
                    if self.ready:  # every head was dropped (cancelled, out of order): go on
                        self.wake.set()
                    continue
            head = self.flights[0]
            with contextlib.suppress(Exception):  # its error is dealt with by _land
                await head.answer
            async with self.lock:
                if self.flights and self.flights[0] is head:  # else a _settle landed it
                    self.flights.popleft()
                    self._land(head)
            if self.ready:
                self.wake.set()

    def _submit(self) -> bool:
        """Assemble the next launch and send it to the model's process; False if no
        session can take part now."""
        batch = self._assemble()
        if not batch:
            return False
        ops = [work.next_op() for work in batch]
        groups = {kind: [row for row, (k, _) in enumerate(ops) if k == kind] for kind in OPERATIONS}
        launches = {
            kind: self._launch_arguments(kind, [batch[r] for r in rows], [ops[r][1] for r in rows])
            for kind, rows in groups.items()
            if rows
        }
        try:
            answer = self.runner.submit(launches)
        except RunnerError as error:  # the model's process is gone
            self._lose(batch, error)
            self.on_failure(error)
            return False
        for work in batch:
            work.session.in_flight += 1
        self.flights.append(Flight(batch, groups, answer))
        return True

    def _land(self, flight: Flight) -> None:
        """Deliver a launch whose answer is in: its outputs to its calls, or its failure."""
        batch, answer = flight.batch, flight.answer
        for work in batch:
            work.session.in_flight -= 1
        error = answer.exception() if not answer.cancelled() else Cancelled("launch cancelled")
        if error is not None:  # a bug, not a request's fault: fail loudly
            assert isinstance(error, Exception)
            self._lose(batch, error)
            if isinstance(error, RunnerError):
                self.on_failure(error)
            return
        results, seconds = answer.result()
        self.observe_batch(len(batch))
        self.observe_step(seconds)
        outputs: list[Any] = [None] * len(batch)
        for kind, rows in flight.groups.items():
            result = results.get(kind)
            for index, row in enumerate(rows):
                outputs[row] = None if result is None else result[index]
        self._deliver(batch, outputs)

    async def _land_flights(self) -> None:
        """`_settle` without blocking the event loop, for the RPCs that read or write a slot
        (create, fork, export, import): await each launch in flight and deliver it. The
        caller holds `self.lock`, so no new launch is sent meanwhile; `asyncio.wait` leaves
        the answer alone if the caller is cancelled, and the batch loop lands it later."""
        while self.flights:
            flight = self.flights[0]
            await asyncio.wait({flight.answer})
            if self.flights and self.flights[0] is flight:
                self.flights.popleft()
                self._land(flight)

    def _settle(self) -> None:
        """Wait for every launch in flight and deliver it, blocking the loop: before the
        pool is read or written outside a launch, so that what is read, parked or
        overwritten has every step its session's count says. The RPCs that do so await
        `_land_flights` first and find nothing left here; it blocks only when a launch
        being assembled restores a parked session."""
        while self.flights:
            flight = self.flights.popleft()
            with contextlib.suppress(Exception):  # its error is dealt with by _land
                self.runner.wait(flight.answer)
            self._land(flight)

    @staticmethod
    def _launch_arguments(kind: str, works: list[Work], arguments: list[Any]) -> tuple[Any, ...]:
        """The host arrays of one operation's launch: slots, then its inputs."""
        slots = np.fromiter((work.session.slot for work in works), np.int64, len(works))
        if kind == "step":
            return slots, np.stack(arguments)
        if kind == "begin":
            noise = np.stack([noise for noise, _ in arguments]).astype(np.float32)
            return slots, noise, np.array([u for _, u in arguments], np.float32)
        if kind == "decode":  # the previous token, then what samples the next one
            return (
                slots,
                np.array([previous for previous, _, _ in arguments], np.int64),
                np.array([s.temperature for _, s, _ in arguments], np.float64),
                np.array([s.top_k for _, s, _ in arguments], np.int64),
                np.array([s.top_p for _, s, _ in arguments], np.float64),
                np.array([uniform for _, _, uniform in arguments], np.float64),
            )
        return slots, np.array(arguments, np.int64)  # encode: one token each

    def _lose(self, batch: list[Work], error: Exception) -> None:
        """A launch raised: its slots may be half-written, so their sessions are ended
        rather than left with a state that no longer matches their step count."""
        log.error(
            "batched step failed",
            exc_info=error,
            extra={"event": "step_failed", "model": self.name},
        )
        for work in batch:
            if self.table.sessions.get(work.session.id) is work.session:
                self._end(work.session, f"was lost: a step failed on the server ({error})")

    def _assemble(self) -> list[Work]:
        """The head call of up to max_batch ready sessions, each with a slot."""
        batch: list[Work] = []
        in_batch: set[str] = set()
        slots_left = True  # False once no slot can be freed for the rest of this pass
        for session in list(self.ready.values()):
            if len(batch) >= self.settings.max_batch:
                break
            if session.in_flight:
                # Only more rows of the call already in flight (started, its caller still
                # there), which do not depend on its outputs; anything else, the session's
                # next call included, waits until those have landed.
                work = session.pending[0] if session.pending else None
                if work is None or not work.started or work.future.done() or not work.runs_ahead():
                    continue
                batch.append(work)
                in_batch.add(session.id)
                continue
            work = self._head(session)
            if work is None:
                continue
            if session.slot is None:
                if not slots_left:
                    continue
                try:
                    if not self._restore(session, in_batch):
                        slots_left = False  # every slot is stepping in this launch
                        continue
                except Exception as error:  # the park directory failed under us
                    log.exception(
                        "restore failed",
                        extra={
                            "event": "restore_failed",
                            "model": self.name,
                            "session": session.id,
                        },
                    )
                    failure = (
                        error
                        if isinstance(error, ServingError)
                        else ServingError(f"session {session.id} could not be restored: {error}")
                    )
                    self._fail_pending(session, failure)
                    continue
            batch.append(work)
            in_batch.add(session.id)
        # A restore above may have landed launches (_settle), ending or finishing calls.
        return [work for work in batch if work.session.slot is not None and not work.finished]

    def _head(self, session: Session) -> Work | None:
        """The session's next call to step, dropping cancelled and out-of-order ones."""
        while session.pending:
            work = session.pending[0]
            if work.future.done():  # the caller went away before it started
                self._finish(work)
                continue
            if not work.started:
                if work.expected_step is not None and work.expected_step != session.step:
                    self._finish(
                        work,
                        error=FailedPrecondition(
                            f"expected_step is {work.expected_step} but session {session.id} "
                            f"is at step {session.step}"
                        ),
                    )
                    continue
                work.started = True
                self.observe_queue_wait(time.perf_counter() - work.enqueued)
            return work
        self.ready.pop(session.id, None)
        return None

    def _deliver(self, batch: list[Work], outputs: list[Any]) -> None:
        for work, output in zip(batch, outputs, strict=True):
            session = work.session
            session.step += 1  # the state took the step, whoever still waits for it
            if work.finished:  # cancelled or ended while this row was in flight
                continue
            if work.take(output) or work.future.done():
                self._finish(work, result=session.step)
            if session.pending:
                self.ready.move_to_end(session.id)
            else:
                self.ready.pop(session.id, None)

    def _finish(
        self, work: Work, result: int | None = None, error: Exception | None = None
    ) -> None:
        """Take a call off its session's queue and answer it (unless its caller left)."""
        session = work.session
        work.finished = True
        session.pending.remove(work)
        self.queued_calls -= 1
        session.last_used = time.monotonic()
        if session.slot is not None and session.id in self.active:
            self.active.move_to_end(session.id)
        if work.future.done():
            return
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result if result is not None else session.step)

    def _fail_pending(self, session: Session, error: Exception) -> None:
        for work in list(session.pending):
            self._finish(work, error=error)
        self.ready.pop(session.id, None)

    # ----------------------------------------------------------------- slots and parking

    def _new_session(self, ttl: float, step: int, seed: int | None) -> Session:
        return Session(
            id=new_session_id(),
            model=self.name,
            ttl=ttl,
            last_used=time.monotonic(),
            step=step,
            seed=seed,
        )

    def _check_live(self, session: Session) -> None:
        """NOT_FOUND if the session ended since the handler looked it up."""
        if self.table.sessions.get(session.id) is not session:
            self.table.get(session.id)  # raises, saying why

    def _mark_used(self, session: Session) -> None:
        session.last_used = time.monotonic()
        if session.id in self.active:
            self.active.move_to_end(session.id)

    def _read_state(self, session: Session) -> dict[str, torch.Tensor]:
        self._settle()
        if session.slot is not None:
            return self.runner.read(session.slot)
        return self.store.peek(session.id)

    def _place(self, session: Session, state: dict[str, torch.Tensor]) -> None:
        """Put a new session's state in a slot, or park it if no slot can be freed."""
        self._settle()
        slot = self._free_a_slot()
        if slot is None:
            self._park_state(session, state)
            self.parked[session.id] = session
        else:
            try:
                self.runner.write(slot, state)
            except ValueError:
                self.free_slots.append(slot)
                raise
            session.slot = slot
            self.active[session.id] = session
        self.table.add(session)

    def _victim(self, exclude: Collection[str] = ()) -> Session | None:
        """Whom to park for a slot: the least recently used idle session, else the least
        recently used busy one outside `exclude` (preempted between launches; its queued
        calls wait while it is parked and bring it back)."""
        busy = None
        for session in self.active.values():
            if not session.pending:
                return session
            if busy is None and session.id not in exclude:
                busy = session
        return busy

    def _free_a_slot(self) -> int | None:
        """A free slot, parking the least recently used idle session if there is none. A
        new session never preempts a busy one: without an idle one it starts parked, and
        its first call restores it (`_restore`, which may preempt)."""
        if self.free_slots:
            return self.free_slots.pop()
        victim = next((s for s in self.active.values() if not s.pending), None)
        return None if victim is None else self._park(victim)

    def _park(self, session: Session) -> int:
        """Move an active session's state to the parking store; returns its slot."""
        self._settle()
        slot = session.slot
        assert slot is not None
        self._park_state(session, self.runner.read(slot))
        session.slot = None
        del self.active[session.id]
        self.parked[session.id] = session
        residence = self.store.residence(session.id) or "parked_host"
        self.metrics.evictions.labels(self.name, residence).inc()
        self._log_session("parked", session, residence=residence)
        return slot

    def _park_state(self, session: Session, state: dict[str, torch.Tensor]) -> None:
        for demoted in self.store.park(session.id, state):
            owner = self.table.sessions.get(demoted)
            model = owner.model if owner is not None else self.name
            self.metrics.evictions.labels(model, "parked_disk").inc()

    def _restore(self, session: Session, exclude: Collection[str]) -> bool:
        """Bring a parked session back into a slot; False if no slot can be freed now
        (every active session is in `exclude`, the launch being assembled)."""
        self._settle()
        victim = None if self.free_slots else self._victim(exclude)
        if victim is None and not self.free_slots:
            return False
        # Out of the store before another session is parked into it: parking first could
        # push this very state from host memory to disk just before reading it back.
        state, source = self.store.unpark(session.id)
        slot = None
        try:
            slot = self._park(victim) if victim is not None else self.free_slots.pop()
            self.runner.write(slot, state)
        except BaseException:
            if slot is not None:
                self.free_slots.append(slot)
            self.store.park(session.id, state)  # back where it was (host memory first)
            raise
        session.slot = slot
        del self.parked[session.id]
        self.active[session.id] = session
        self.metrics.restores.labels(self.name, source).inc()
        self._log_session("restored", session, source=source)
        return True

    def _end(self, session: Session, why: str) -> None:
        """Remove a session and free its slot or parked state."""
        if session.slot is None:
            try:
                self.store.delete(session.id)
            except OSError:  # the file stays behind; the session ends regardless
                log.exception(
                    "could not delete a parked state",
                    extra={"event": "store_error", "model": self.name, "session": session.id},
                )
        self._fail_pending(session, NotFound(f"session {session.id} {why}"))
        if session.slot is not None:
            self.free_slots.append(session.slot)
            session.slot = None
            self.active.pop(session.id, None)
        else:
            self.parked.pop(session.id, None)
        self.table.remove(session, why)

    async def _expiry_loop(self) -> None:
        period = min(1.0, max(0.05, self.settings.session_ttl / 4))
        while True:
            await asyncio.sleep(period)
            if not self.runner.alive:  # noticed while idle, not only at the next launch
                self.on_failure(RunnerError(f"the model process of {self.name} exited"))
            try:
                await self._expire()
            except Exception:  # keep sweeping: one bad session must not stop expiry
                log.exception(
                    "expiry sweep failed", extra={"event": "expiry_error", "model": self.name}
                )

    async def _expire(self) -> None:
        """End the sessions idle for longer than their TTL (none with calls queued)."""
        now = time.monotonic()
        expired = [
            s
            for s in (*self.active.values(), *self.parked.values())
            if not s.pending and now - s.last_used > s.ttl
        ]
        if not expired:
            return
        async with self.lock:
            for session in expired:
                if session.pending or self.table.sessions.get(session.id) is not session:
                    continue
                self._end(session, f"expired after {session.ttl:g} s idle")
                self.metrics.evictions.labels(self.name, "expired").inc()
                self._log_session("expired", session)

    def _log_session(self, event: str, session: Session, **fields: Any) -> None:
        """One log line about a session: "session EVENT", event name "session_EVENT"."""
        log.info(
            f"session {event}",
            extra={
                "event": f"session_{event}",
                "model": self.name,
                "session": session.id,
                **fields,
            },
        )

    # ----------------------------------------------------------------- metrics

    def _register_gauges(self) -> None:
        m, name = self.metrics, self.name
        m.add_model(name)
        # Label lookups once, not per step.
        self.observe_batch = m.batch_size.labels(name).observe
        self.observe_step = m.step_duration.labels(name, self.backend).observe
        self.observe_queue_wait = m.queue_wait.labels(name).observe
        self.observe_ttft = m.time_to_first_token.labels(name).observe
        self.observe_itl = m.inter_token_latency.labels(name).observe
        m.slots_capacity.labels(name).set(self.settings.slots)
        m.slots_used.labels(name).set_function(lambda: len(self.active))
        m.queue_length.labels(name).set_function(lambda: self.queued_calls)
        m.sessions.labels(name, "active").set_function(lambda: len(self.active))
        m.sessions.labels(name, "parked_host").set_function(
            lambda: sum(1 for key in list(self.parked) if key in self.store.host)
        )
        m.sessions.labels(name, "parked_disk").set_function(
            lambda: sum(1 for key in list(self.parked) if key not in self.store.host)
        )

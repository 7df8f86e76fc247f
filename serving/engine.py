"""One served model: the parts that serve its sessions, wired together, and its batch loop.

The path of a call: `step` or `generate` queues it on its session (`Scheduler.add`); the
batch loop wakes, asks the scheduler for the next launch's rows (`schedule`, which asks the
slot manager to restore parked sessions), sends the launch (`Pipeline.send`) and, once the
oldest launch's answer is in, lands it (`Pipeline.land_oldest` -> `update_from_output`),
which answers the calls that are done. Creating, forking, importing, exporting, deleting and
expiring sessions is `Lifecycle`'s.

Continuous batching: each launch takes the head call of up to `max_batch` ready sessions in
turn and advances each by ONE row (up to `steps_per_launch` steps of a Step call, or one
token of a Generate); a call of T steps takes ceil(T / steps_per_launch) launches, other
sessions interleave with it, and calls that arrive while launches are in flight join the
next one. Everything that touches the pool or the session bookkeeping
holds `self.lock`, an asyncio lock on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protos import journal_pb2
from serving.answers import Answers
from serving.calls import Call, StepCall
from serving.durable.committer import Durability
from serving.errors import (
    Cancelled,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from serving.generation import GenerateCall, Sampling, prompt_tokens, require_text, text_tokenizer
from serving.lifecycle import Lifecycle
from serving.metrics import Metrics
from serving.persistence import Checkpoint, Persistence
from serving.pipeline import Pipeline
from serving.protocol import ModelCard
from serving.pushback import Pushback
from serving.requests import answered_step, reply_seed
from serving.scheduler import Scheduler
from serving.sessions import Session, SessionTable
from serving.slots import SlotManager
from serving.store import ParkingStore
from serving.worker_client import WorkerClient, WorkerGone

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
    steps_per_launch: int = 1  # steps of a Step call one launch may run back to back
    max_queued_calls: int = 4096  # calls queued or running on this model, at most
    max_sessions: int = 1_000_000  # sessions of the whole server (every model), at most


class ModelEngine:
    """The sessions of one model and the batch loop that steps them. `card` is what the
    model's worker said of it; `worker` runs the model and holds the slots of its pool."""

    def __init__(
        self,
        name: str,
        card: ModelCard,
        worker: WorkerClient,
        settings: EngineSettings,
        table: SessionTable,
        store: ParkingStore,
        metrics: Metrics,
        durability: Durability | None = None,
    ) -> None:
        durability = durability or Durability()
        self.name = name
        self.card = card
        self.settings = settings
        self.table = table
        self.metrics = metrics
        self.worker = worker
        self.tokenizer = text_tokenizer(card)
        self.lock = asyncio.Lock()
        self.pushback = Pushback()  # how long a call refused for a full queue should wait
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # Called when the model's process is gone; the server drains and exits non-zero.
        self.on_failure: Callable[[WorkerGone], None] = lambda error: None
        self.scheduler = Scheduler(
            settings.max_batch,
            self._started,
            steps_per_launch=settings.steps_per_launch,
            keep_ops=durability.committer is not None,  # only a durable store logs them
        )
        self.slots = SlotManager(
            name, settings.slots, store, worker, self.scheduler.has_calls, self._flying,
            table, metrics,
        )  # fmt: skip
        self.pipeline = Pipeline(
            name, card.backend, worker, self.scheduler, self.slots, table, metrics,
            lose=self.lose, on_failure=lambda error: self.on_failure(error),
        )  # fmt: skip
        self.pipeline.on_written = self.wake.set
        self.persistence = Persistence(
            name, card, table, self.slots, self.scheduler, self.pipeline, self.lock, self.end,
            durability,
        )  # fmt: skip
        self.lifecycle = Lifecycle(
            name, card, settings.session_ttl, settings.max_session_ttl, table, self.slots,
            self.scheduler, self.pipeline, self.lock, self.end, metrics, self.persistence,
        )  # fmt: skip
        self.lifecycle.max_sessions = settings.max_sessions
        self.answers = Answers(
            durability.committer, durability.mode, self.slots, table, self.persistence.unload
        )
        self.scheduler.on_finish = self.answers.finished
        self.pipeline.landing = self.answers.landing
        self.persistence.committing = self.answers.committing
        self.answers.on_settled = self.persistence.settled
        self._register_gauges()

    # ------------------------------------------------------------------ calls

    async def step(
        self,
        session: Session,
        inputs: np.ndarray,
        expected_step: int | None,
        request_id: str = "",
        digest: bytes = b"",
    ) -> tuple[np.ndarray, int]:
        """Run the T steps of `inputs` `[T, input_size]` on the session, in the batch loop.

        Returns the outputs `[T, output_size]` and the step count after them. Without a
        request id, cancelling the caller stops the call at the next launch and the steps
        already taken stay; with one, the call runs to its end whatever the caller does, and
        a repeat of the id gets its answer (`serving.requests`).
        """
        await self.persistence.ensure_loaded(session)
        self.persistence.keep_alive((session,))
        if request_id:
            earlier = await session.requests.earlier(request_id, digest)
            if earlier is not None:
                return answered_step(earlier, session.step)
        call = StepCall(
            session=session,
            inputs=inputs,
            outputs=np.empty((inputs.shape[0], self.card.output_size), dtype=np.float32),
            expected_step=expected_step,
            enqueued=time.perf_counter(),
            request_id=request_id,
            digest=digest,
        )
        step = await self._enqueue(call)  # with an id, cancelling this leaves the call running
        return call.outputs, step

    async def generate(
        self,
        session: Session,
        text: str,
        sampling: Sampling,
        seed: int | None,
        request_id: str = "",
        digest: bytes = b"",
        charge: Callable[[int], None] = lambda steps: None,
    ) -> GenerateCall | journal_pb2.Reply:
        """Queue a Generate call on the session; iterate `call.stream()` for the reply. A
        repeat of a request id that answered gets that reply back instead.

        The turn is all or nothing: if it fails or its caller leaves (cancelling its future),
        the session goes back to its state and step count from before the turn.
        """
        tokenizer = require_text(self.tokenizer, self.card, self.name)
        prompt = prompt_tokens(tokenizer, text, self.settings.max_steps_per_call)
        charge(len(prompt) + 2 * sampling.max_tokens + 2)  # the turn's steps, at most
        await self.persistence.ensure_loaded(session)
        self.persistence.keep_alive((session,))
        if request_id:
            earlier = await session.requests.earlier(request_id, digest)
            if earlier is not None:
                return earlier.reply
        call = GenerateCall(
            session=session,
            enqueued=time.perf_counter(),
            prompt=prompt,
            sampling=sampling,
            rng=np.random.default_rng(reply_seed(seed, session.seed, request_id)),
            tokenizer=tokenizer,
            latent_size=self.card.spec("z").shape[0],
            request_id=request_id,
            digest=digest,
        )
        self._enqueue(call)
        return call

    def _enqueue(self, call: Call) -> asyncio.Future[int]:
        try:
            self.table.check_live(call.session)
            if self.scheduler.queued_calls >= self.settings.max_queued_calls:
                raise ResourceExhausted(
                    f"model {self.name!r} has {self.scheduler.queued_calls} calls queued, the "
                    "most it takes (max_queued_calls)",
                    retry_after=self.pushback.refused(),
                )
        except ServingError as error:
            if call.request_id:
                call.session.requests.fail(call.request_id, error)
            raise
        self.pushback.admitted()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        call.future = future  # cancelled: the call is abandoned (`Call.abandoned`)
        self.scheduler.add(call)
        self.wake.set()
        return future

    def _started(self, call: Call) -> None:
        self.observe_queue_wait(time.perf_counter() - call.enqueued)
        if isinstance(call, GenerateCall):
            self.slots.save(call)  # the state before the turn, to undo it if it fails

    def _flying(self, session: Session) -> bool:
        return session.id in self.scheduler.in_flight

    def lose(self, session: Session, error: Exception) -> None:
        """A launch with the session's rows failed: what its slot holds is unknown. With a
        session store the session is forgotten here and kept there at its last committed
        step (nothing of the failed call is committed): its calls are answered UNAVAILABLE,
        and its next call brings it back from the store, on this server or, if the model's
        process is gone, on the one that replaces it. Without a store it is lost."""
        why = f"a step failed on the server ({error})"
        if self.persistence.committer is not None:
            self.slots.unload(session)  # first: its calls' commits see it is not live here
            self.scheduler.drop(session, Unavailable(
                f"session {session.id}: {why}; the session store keeps it at its last "
                "committed step: retry"
            ))  # fmt: skip
            return
        if isinstance(error, WorkerGone):  # the server exits: its clients retry elsewhere
            self.scheduler.drop(session, Unavailable(f"session {session.id} was lost: {why}"))
        self.end(session, f"was lost: {why}")

    def end(self, session: Session, why: str) -> None:
        """Remove a session: free its slot or parked state, answer its calls NOT_FOUND."""
        self.slots.release(session)
        self.scheduler.drop(session, NotFound(f"session {session.id} {why}"))
        self.table.remove(session, why)

    # ------------------------------------------------------------------ the loops

    def start(self) -> None:
        """Start the batch loop and the expiry sweep (on the running event loop)."""
        self.tasks = [
            asyncio.create_task(self._batch_loop(), name=f"batch-{self.name}"),
            asyncio.create_task(self._expiry_loop(), name=f"expiry-{self.name}"),
        ]

    async def stop(self) -> Checkpoint:
        """Stop the loops; the launches in flight land, calls still queued are answered
        CANCELLED (a Step call keeps the steps it took, a Generate turn is undone), and with
        a durable store every session's state is written in whole. A model process that
        has stopped answering is killed by its client's watchdog (`model_timeout`), and its
        calls fail as if it had died. Returns how many states were written, and how many
        could not be."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self.lock:
            await self.pipeline.land_all()
            self.scheduler.drop_all(Cancelled("the server shut down before this call ended"))
        done = await self.persistence.checkpoint() if self.worker.alive else Checkpoint()
        self.worker.close()
        return done

    async def _batch_loop(self) -> None:
        scheduler, pipeline = self.scheduler, self.pipeline
        delay = self.settings.max_queue_delay
        while True:
            if not pipeline.flights:
                await self.wake.wait()
                if delay > 0 and len(scheduler.ready) < self.settings.max_batch:
                    await asyncio.sleep(delay)  # let more sessions join this launch
            async with self.lock:
                self.wake.clear()
                while pipeline.has_room() and pipeline.send(
                    scheduler.schedule(self.slots, pipeline.may_start()),
                    self.slots.take_moves(),
                ):
                    pass
                if not pipeline.flights:
                    # Every head was dropped (left, out of order): go on. Calls held for a
                    # commit: its landing wakes the loop.
                    if scheduler.ready and pipeline.may_start():
                        self.wake.set()
                    continue
            await pipeline.land_oldest(self.lock)
            if scheduler.ready:
                self.wake.set()

    async def _expiry_loop(self) -> None:
        period = min(1.0, max(0.05, self.settings.session_ttl / 4))
        while True:
            await asyncio.sleep(period)
            if not self.worker.alive:  # noticed while idle, not only at the next launch
                self.on_failure(WorkerGone(f"the model process of {self.name} exited"))
            try:
                await self.lifecycle.expire()
            except Exception:  # keep sweeping: one bad session must not stop expiry
                log.exception(
                    "expiry sweep failed", extra={"event": "expiry_error", "model": self.name}
                )

    # ------------------------------------------------------------------ metrics

    def _register_gauges(self) -> None:
        m, name, slots = self.metrics, self.name, self.slots
        m.add_model(name)
        self.observe_queue_wait = m.queue_wait.labels(name).observe  # looked up once
        self.observe_ttft = m.time_to_first_token.labels(name).observe
        self.observe_itl = m.inter_token_latency.labels(name).observe
        m.slots_capacity.labels(name).set(self.settings.slots)
        m.slots_used.labels(name).set_function(lambda: len(slots.active))
        m.queue_length.labels(name).set_function(lambda: self.scheduler.queued_calls)
        m.queue_capacity.labels(name).set(self.settings.max_queued_calls)
        m.sessions.labels(name, "active").set_function(lambda: len(slots.active))
        for residence in ("parked_host", "parked_disk", "stored"):
            m.sessions.labels(name, residence).set_function(
                lambda residence=residence: slots.count(residence)  # type: ignore[misc]
            )

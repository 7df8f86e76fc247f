"""A session's life outside its calls: create, fork, import, export, delete, expiry; and,
with a durable store, its records: committed before the reply, adopted after a restart,
brought back by replay on first use, written in whole now and then.

Each of create .. export holds the engine's lock and first lands every launch in flight, so
the session's step count includes all its rows and no launch runs while a slot is claimed,
filled or read. A new session's state crosses the pipe only when it must: the worker resets
the slot (create) or copies the parent's (fork); an import writes its state, an export reads
one, a fork reads the child's to commit it (durable stores only) or when every slot is busy.

Snapshots (a session's whole state, so that bringing it back replays little): when an idle
session is parked, at drain, and in the expiry sweep for idle active sessions, once a
session has run `snapshot_every` steps since its last one; with `--durability park`, at
every park and at drain, since nothing else is written then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from models.state import validate_state
from serving import journal
from serving.durable.base import SessionSummary
from serving.durable.committer import Committer, Durability
from serving.durable.records import replay_row
from serving.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from serving.export import ImportedState, export_state, import_state
from serving.logs import log_session
from serving.metrics import Metrics
from serving.pipeline import Pipeline
from serving.protocol import ModelCard, Replay
from serving.requests import RecentSessions, RequestLog
from serving.scheduler import Scheduler
from serving.sessions import Session, SessionTable, new_session_id
from serving.slots import SlotManager, State
from serving.worker import host_state

log = logging.getLogger("memserve.lifecycle")

SNAPSHOTS_PER_SWEEP = 8  # idle sessions written in whole per expiry sweep, at most


class Lifecycle:
    """The sessions of one model: where they begin and end, and their records."""

    def __init__(
        self,
        name: str,
        card: ModelCard,
        default_ttl: float,
        max_ttl: float,
        table: SessionTable,
        slots: SlotManager,
        scheduler: Scheduler,
        pipeline: Pipeline,
        lock: asyncio.Lock,
        end: Callable[[Session, str], None],
        metrics: Metrics,
        durability: Durability,
    ) -> None:
        self.name = name
        self.card = card
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.table = table
        self.slots = slots
        self.worker = slots.worker
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.lock = lock
        self.end = end
        self.metrics = metrics
        self.committer: Committer | None = durability.committer
        self.mode = durability.mode
        self.snapshot_every = durability.snapshot_every
        self.recent = RecentSessions()
        self.loading: dict[str, asyncio.Future[None]] = {}
        self.unloading: set[asyncio.Future[None]] = set()
        slots.on_parked = self.parked

    def check_ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.default_ttl
        if not (np.isfinite(ttl) and 0 < ttl <= self.max_ttl):
            raise InvalidArgument(f"ttl_seconds must be > 0 and <= {self.max_ttl:g}, got {ttl}")
        return ttl

    # ------------------------------------------------------------------ beginnings

    async def create(
        self, ttl: float | None, seed: int | None, request_id: str = "", digest: bytes = b""
    ) -> Session:
        """A new session at step 0 in the model's initial state."""
        earlier = await self._earlier(request_id, digest)
        if earlier is not None:
            return earlier
        session = self._new_session(self.check_ttl(ttl), step=0, seed=seed)
        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, self.worker.reset, self._initial_state)
        await self._commit_made(session, None, request_id, digest)
        log_session(log, "created", self.name, session.id, residence=self.slots.residence(session))
        return session

    async def fork(
        self, parent: Session, ttl: float | None, request_id: str = "", digest: bytes = b""
    ) -> Session:
        """A new session holding a copy of `parent`'s state and step count."""
        earlier = await self._earlier(request_id, digest)
        if earlier is not None:
            return earlier
        ttl = self.check_ttl(ttl) if ttl is not None else parent.ttl
        await self.ensure_loaded(parent)
        async with self.lock:
            await self.pipeline.land_all()  # the parent's count must include its rows in flight
            self.table.check_live(parent)
            child = self._new_session(ttl, step=parent.step, seed=parent.seed)
            child.requests = RequestLog()
            source = parent.slot
            if source is None:  # parked: the child starts parked with a copy
                self.slots.add_parked(child, self.slots.read(parent))
                self.table.add(child)
            else:
                self.slots.touch(parent)

                async def copy(slot: int) -> None:
                    await self.worker.copy(source, slot)

                async def read() -> State:
                    return await self.worker.read(source)

                await self._place(child, copy, read, keep=(parent.id,))
            state = await self._state_of(child) if self.committer is not None else None
        await self._commit_made(child, state, request_id, digest)
        log_session(log, "forked", self.name, child.id, parent=parent.id)
        return child

    async def import_(
        self,
        imported: ImportedState,
        ttl: float | None,
        request_id: str = "",
        digest: bytes = b"",
    ) -> Session:
        """A new session from what `export` returned (on this server or another)."""
        ttl = self.check_ttl(ttl)
        if imported.model_digest and imported.model_digest != self.card.weights_digest:
            raise FailedPrecondition(
                f"state was exported from different weights of model {imported.model!r} "
                f"(digest {imported.model_digest[:12]}, this server has "
                f"{self.card.weights_digest[:12]})"
            )
        try:
            validate_state(self.card.state_specs, imported.tensors)
        except ValueError as error:
            raise InvalidArgument(f"state does not fit model {self.name!r}: {error}") from error
        earlier = await self._earlier(request_id, digest)
        if earlier is not None:
            return earlier
        state = imported.tensors
        session = self._new_session(ttl, step=imported.step, seed=None)

        async def write(slot: int) -> None:
            await self.worker.write(slot, state)

        async def given() -> State:
            return state

        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, write, given)
        await self._commit_made(session, state, request_id, digest)
        log_session(log, "imported", self.name, session.id, step=session.step)
        return session

    async def _earlier(self, request_id: str, digest: bytes) -> Session | None:
        """The session an earlier call with this request id made (waiting for it if it is
        still making it), or None after noting that this call makes one under the id."""
        if not request_id:
            return None
        now = time.time()
        earlier = self.recent.find(request_id, digest, now)
        if earlier is None:
            self.recent.begin(request_id, digest, now)
            return None
        await earlier.done.wait()
        if earlier.error is not None:
            raise earlier.error
        return self.table.get(earlier.session_id)

    async def _commit_made(
        self, session: Session, state: State | None, request_id: str, digest: bytes
    ) -> None:
        """Commit a new session before its reply; if that fails, it is as if never made."""
        try:
            if self.committer is not None:
                record = journal.created(
                    session, self.card.weights_digest, state, request_id, digest
                )
                if session.id in await self.committer.commit([record]):
                    raise Unavailable(f"the session store refused new session {session.id}")
        except Exception as error:
            async with self.lock:
                if self.table.live(session):
                    self.end(session, "could not be committed")
            if request_id:
                self.recent.fail(request_id, error)
            raise
        if request_id:
            self.recent.finish(request_id, session.id)

    # ------------------------------------------------------------------ reading, ending

    async def export(self, session: Session) -> tuple[bytes, int]:
        """The session's state as safetensors bytes, with its step count."""
        await self.ensure_loaded(session)
        async with self.lock:
            await self.pipeline.land_all()  # the count must include the rows in flight
            self.table.check_live(session)
            state, step = await self._state_of(session), session.step
        return export_state(state, self.name, self.card.weights_digest, step), step

    async def _state_of(self, session: Session) -> State:
        """A copy of a loaded session's state (the caller holds the lock, flights landed)."""
        if session.slot is None:
            return self.slots.read(session)
        return await self.worker.read(session.slot)

    async def delete(self, session: Session) -> None:
        """End a session; calls still queued for it are answered NOT_FOUND. With a durable
        store the deletion is committed first: if it cannot be, nothing changes."""
        async with self.lock:
            self.table.check_live(session)
            if self.committer is not None:
                await self.committer.commit([journal.deleted(session, "deleted")])
            self.end(session, "was deleted")
        log_session(log, "deleted", self.name, session.id)

    async def expire(self) -> None:
        """End the sessions idle for longer than their TTL (none with calls queued)."""
        now = time.monotonic()
        slots = self.slots
        candidates = (*slots.active.values(), *slots.parked.values(), *slots.stored.values())
        expired = [s for s in candidates if now - s.last_used > s.ttl]
        if expired:
            async with self.lock:
                records = []
                for session in expired:
                    if self.scheduler.has_calls(session) or not self.table.live(session):
                        continue
                    why = f"expired after {session.ttl:g} s idle"
                    self.end(session, why)
                    records.append(journal.deleted(session, why))
                    self.metrics.evictions.labels(self.name, "expired").inc()
                    log_session(log, "expired", self.name, session.id)
            if records and self.committer is not None:
                self.committer.commit(records).add_done_callback(_log_failure)
        await self._snapshot_idle()

    # ------------------------------------------------------------------ stored sessions

    def adopt(self, summary: SessionSummary) -> Session:
        """A session found in the store at start: known at once, its state brought back on
        first use. One that cannot be (damaged, other weights) answers why, every time."""
        session = Session(
            id=summary.session_id,
            model=self.name,
            ttl=summary.ttl,
            last_used=time.monotonic(),
            step=summary.step,
            seed=summary.seed,
        )
        if summary.error is not None:
            session.broken = DataLoss(f"session {session.id} cannot be restored: {summary.error}")
        elif summary.weights_digest != self.card.weights_digest:
            session.broken = FailedPrecondition(
                f"session {session.id} was made with other weights of model {self.name!r} "
                f"(digest {summary.weights_digest[:12]}, this server has "
                f"{self.card.weights_digest[:12]})"
            )
        if summary.request_id:
            self.recent.load(summary.request_id, summary.request_digest, session.id, summary.made)
        self.slots.add_stored(session)
        self.table.add(session)
        return session

    async def ensure_loaded(self, session: Session) -> None:
        """Bring a stored session's state back (once, whoever asks first)."""
        if session.broken is not None:
            raise session.broken
        if not self.slots.is_stored(session):
            return
        loading = self.loading.get(session.id)
        if loading is None:
            loading = self.loading[session.id] = asyncio.ensure_future(self._load(session))
            loading.add_done_callback(lambda _: self.loading.pop(session.id, None))
        await asyncio.shield(loading)

    async def _load(self, session: Session) -> None:
        """The stored snapshot (or creation) with the calls after it replayed in the worker,
        alone, which gives the bits the batched launches gave."""
        assert self.committer is not None
        try:
            stored = await self.committer.run(self.committer.store.load, session.id)
        except KeyError:
            async with self.lock:
                if self.table.live(session):
                    self.end(session, "is no longer in the session store")
            raise NotFound(f"session {session.id} is no longer in the session store") from None
        except DataLoss as error:
            session.broken = error
            raise
        base = stored.snapshot.state if stored.snapshot is not None else stored.created.state
        start = stored.snapshot.step if stored.snapshot is not None else stored.created.step
        rows = tuple(replay_row(op) for call in stored.calls for op in call.operations)
        if start + len(rows) != stored.step:
            session.broken = DataLoss(
                f"session {session.id} cannot be restored: its records hold {len(rows)} steps "
                f"after step {start}, not the {stored.step - start} its count says"
            )
            raise session.broken
        initial = host_state(import_state(base).tensors) if base else None
        arrays = await self.worker.send(Replay(initial, rows))
        async with self.lock:
            if not self.slots.is_stored(session) or not self.table.live(session):
                return
            session.step = stored.step
            session.requests = RequestLog()
            session.requests.load(stored.responses)
            session.logged_ops = len(rows)
            self.slots.unstore(session, {n: torch.from_numpy(a) for n, a in arrays.items()})
        log_session(log, "loaded", self.name, session.id, step=session.step, replayed=len(rows))

    def unload(self, session: Session, failure: Exception) -> None:
        """A commit of the session's failed: forget what is here, keep what the store has
        (the next call brings it back from there)."""
        task = asyncio.ensure_future(self._unload(session, failure))
        self.unloading.add(task)
        task.add_done_callback(self.unloading.discard)

    async def _unload(self, session: Session, failure: Exception) -> None:
        async with self.lock:
            await self.pipeline.land_all()
            if not self.table.live(session) or self.slots.is_stored(session):
                return
            self.scheduler.drop(session, Unavailable(f"session {session.id}: {failure}"))
            self.slots.unload(session)
        log_session(log, "unloaded", self.name, session.id, why=str(failure))

    # ------------------------------------------------------------------ snapshots

    def parked(self, session: Session, state: State) -> None:
        """A state went to the parking store: write it durably if it is due."""
        due = self.mode == "park" or session.logged_ops >= self.snapshot_every
        idle = not self.scheduler.has_calls(session)  # mid-call states are not committed
        if self.committer is not None and session.logged_ops and due and idle:
            self._snapshot(session, state)

    def _snapshot(self, session: Session, state: State) -> asyncio.Future[set[str]]:
        assert self.committer is not None
        session.logged_ops = 0
        record = journal.snapshot(session, self.card.weights_digest, state)
        done = self.committer.commit([record])
        done.add_done_callback(_log_failure)
        return done

    async def _snapshot_idle(self) -> None:
        """A few idle active sessions that are due, written in whole."""
        if self.committer is None or self.mode == "park":
            return
        due = [
            s for s in self.slots.active.values()
            if s.logged_ops >= self.snapshot_every and not self.scheduler.has_calls(s)
        ][:SNAPSHOTS_PER_SWEEP]  # fmt: skip
        if not due:
            return
        async with self.lock:
            await self.pipeline.land_all()
            for session in due:
                if session.slot is not None and not self.scheduler.has_calls(session):
                    self._snapshot(session, await self.worker.read(session.slot))

    async def checkpoint(self) -> int:
        """At drain: every session with steps since its last snapshot written in whole (none
        has calls any more). Returns how many."""
        if self.committer is None:
            return 0
        written = 0
        async with self.lock:
            for session in [*self.slots.active.values(), *self.slots.parked.values()]:
                if session.logged_ops and self.table.live(session):
                    self._snapshot(session, await self._state_of(session))
                    written += 1
        await self.committer.flush()
        return written

    # ------------------------------------------------------------------ helpers

    def _new_session(self, ttl: float, step: int, seed: int | None) -> Session:
        return Session(
            id=new_session_id(),
            model=self.name,
            ttl=ttl,
            last_used=time.monotonic(),
            step=step,
            seed=seed,
        )

    async def _initial_state(self) -> State:
        return {name: torch.from_numpy(array) for name, array in self.card.initial_state.items()}

    async def _place(
        self,
        session: Session,
        fill: Callable[[int], Awaitable[None]],
        state: Callable[[], Awaitable[State]],
        keep: tuple[str, ...] = (),
    ) -> None:
        """Give a new session a slot and `fill` it there, or park `state()` if every active
        session is busy; then it is live. The caller holds the lock with no launch in flight."""
        slot = await self.slots.claim(keep)
        if slot is None:
            self.slots.add_parked(session, await state())
        else:
            try:
                await fill(slot)
            except BaseException:
                self.slots.unclaim(slot)
                raise
            self.slots.add_active(session, slot)
        self.table.add(session)


def _log_failure(done: asyncio.Future[set[str]]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("a background commit failed: %s", done.exception(),
                  extra={"event": "commit_failed"})  # fmt: skip

"""A session's records in the session store, beyond its beginning and end: sessions found
in the store after a restart (adopted: known at once, their state brought back on first use,
by replaying the calls after their snapshot in the worker), sessions unloaded when a commit
of theirs fails (the store is right, this server is ahead), and snapshots (a session's whole
state, so that bringing it back replays little): when an idle session is parked, at drain,
and in the expiry sweep for idle active sessions, once it has run `snapshot_every` steps
since its last one; with `--durability park`, at every park and at drain, since nothing
else is written then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch

from models.state import complete_state
from serving import journal
from serving.answers import commit_failure
from serving.durable.base import SessionSummary, StoreUnavailable
from serving.durable.committer import Committer, Durability
from serving.durable.records import CorruptRecordError, replay_row
from serving.errors import DataLoss, FailedPrecondition, NotFound, Unavailable
from serving.export import import_state
from serving.logs import log_session
from serving.pipeline import Pipeline
from serving.protocol import ModelCard, Replay, steps_of
from serving.requests import RecentSessions, RequestLog, scoped
from serving.scheduler import Scheduler
from serving.sessions import Session, SessionTable
from serving.slots import SlotManager, State
from serving.worker import host_state

log = logging.getLogger("memserve.persistence")

SNAPSHOTS_PER_SWEEP = 8  # idle sessions written in whole per expiry sweep, at most
LOAD_TRIES = 3  # loads of a session that other replicas keep advancing, before "retry"


class Persistence:
    """One model's sessions and the session store, past their beginnings and ends."""

    def __init__(
        self,
        name: str,
        card: ModelCard,
        table: SessionTable,
        slots: SlotManager,
        scheduler: Scheduler,
        pipeline: Pipeline,
        lock: asyncio.Lock,
        end: Callable[[Session, str], None],
        durability: Durability,
    ) -> None:
        self.name = name
        self.card = card
        self.table = table
        self.slots = slots
        self.worker = slots.worker
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.lock = lock
        self.end = end
        self.committer: Committer | None = durability.committer
        self.mode = durability.mode
        self.snapshot_every = durability.snapshot_every
        self.replica = durability.replica  # "" unless one replica of a cluster
        self.recent = RecentSessions()  # create/fork/import request ids (the lifecycle's)
        self.loading: dict[str, asyncio.Future[None]] = {}
        self.unloading: set[asyncio.Future[None]] = set()
        self.touching: set[str] = set()  # sessions whose expiry a touch is restarting now
        self.touches: set[asyncio.Future[None]] = set()
        # Sessions a commit of which failed, until they are unloaded: what they hold here
        # is ahead of the store, by steps whose callers heard of the failure, so it is
        # never written in whole (a snapshot would commit those steps after all, and a
        # retry would take them again).
        self.diverged: set[str] = set()
        self.committing: Counter[str] = Counter()  # commits in flight per session (answers')
        self.snapshotting: dict[str, asyncio.Future[None]] = {}  # settled and due, per session
        slots.on_parked = self.parked

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
            tenant=summary.tenant,
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
            key = scoped(summary.tenant, summary.request_id)
            self.recent.load(key, summary.request_digest, session.id, summary.made)
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

    async def _load(self, session: Session, tries: int = LOAD_TRIES) -> None:
        """The stored snapshot (or creation) with the calls after it replayed in the worker,
        alone, which gives the bits the batched launches gave."""
        assert self.committer is not None
        try:
            stored = await self.committer.run(self.committer.store.load, session.id)
        except KeyError:
            raise await self._gone(session) from None
        except DataLoss as error:
            session.broken = error
            raise
        base = stored.snapshot.state if stored.snapshot is not None else stored.created.state
        start = stored.snapshot.step if stored.snapshot is not None else stored.created.step
        try:
            rows = tuple(replay_row(op) for call in stored.calls for op in call.operations)
        except CorruptRecordError as error:  # intact bytes this server cannot replay
            session.broken = DataLoss(f"session {session.id} cannot be restored: {error}")
            raise session.broken from error
        steps = steps_of(rows)
        if start + steps != stored.step:
            session.broken = DataLoss(
                f"session {session.id} cannot be restored: its records hold {steps} steps "
                f"after step {start}, not the {stored.step - start} its count says"
            )
            raise session.broken
        initial = (
            host_state(complete_state(self.card.state_specs, import_state(base).tensors))
            if base
            else None
        )
        arrays = await self.worker.send(Replay(initial, rows))
        if self.replica:
            # This replica serves it from now on, so its reads elsewhere must reload. Claimed
            # while it is still stored, so that no call of this replica's can commit first
            # (the claim restarts its expiry in the store too).
            if not self.table.live(session):
                return
            claiming = time.monotonic()
            claimed = await self.committer.run(self.committer.store.claim, session.id)
            if claimed is None:
                raise await self._gone(session)
            if claimed != stored.step:  # another replica moved it on: bring that back
                if tries <= 1:
                    raise Unavailable(
                        f"session {session.id} is being advanced by another replica; retry"
                    )
                await self._load(session, tries - 1)
                return
            session.touched = claiming
        async with self.lock:
            if not self.slots.is_stored(session) or not self.table.live(session):
                return
            session.step = stored.step
            session.requests = RequestLog()
            session.requests.load(stored.responses)
            session.logged_ops = steps
            self.slots.unstore(session, {n: torch.from_numpy(a) for n, a in arrays.items()})
        log_session(log, "loaded", self.name, session.id, step=session.step, replayed=len(rows))

    def keep_alive(self, sessions: Iterable[Session]) -> None:
        """A replica restarts the expiry, in the shared store, of sessions it is serving that
        nothing has written or touched for half their TTL: the store ends a session nobody
        used for its TTL, and a call may begin close to that, or last longer."""
        if not self.replica or self.committer is None or not self.committer.healthy:
            return
        now = time.monotonic()
        stale = [
            session
            for session in sessions
            if now - max(session.last_used, session.touched) > session.ttl / 2
            and session.id not in self.touching
        ]
        if stale:
            self.touching.update(session.id for session in stale)
            task = asyncio.ensure_future(self._touch(stale, now))
            self.touches.add(task)
            task.add_done_callback(self.touches.discard)

    async def _touch(self, sessions: list[Session], since: float) -> None:
        assert self.committer is not None
        try:
            await self.committer.run(self.committer.store.touch, [s.id for s in sessions])
        except StoreUnavailable as error:  # the commits of their calls will say so too
            log.warning(
                "could not restart the expiry of %d sessions: %s", len(sessions), error,
                extra={"event": "touch_failed", "model": self.name},
            )  # fmt: skip
        else:
            for session in sessions:
                session.touched = max(session.touched, since)
        finally:
            self.touching.difference_update(session.id for session in sessions)

    async def _gone(self, session: Session) -> NotFound:
        """The store no longer holds a session this server knows: it ends here too."""
        async with self.lock:
            if self.table.live(session):
                self.end(session, "is no longer in the session store")
        return NotFound(f"session {session.id} is no longer in the session store")

    def forget(self, session: Session, why: str) -> None:
        """Drop a session from this replica only; it goes on in the shared store. The caller
        holds the lock."""
        self.slots.release(session)
        self.scheduler.drop(session, Unavailable(f"session {session.id} {why}; retry"))
        self.table.forget(session)
        log_session(log, "forgotten", self.name, session.id, why=why)

    def unload(self, session: Session, failure: Exception) -> None:
        """A commit of the session's failed: forget what is here, keep what the store has
        (the next call brings it back from there)."""
        self.diverged.add(session.id)
        task = asyncio.ensure_future(self._unload(session, failure))
        self.unloading.add(task)
        task.add_done_callback(self.unloading.discard)

    async def _unload(self, session: Session, failure: Exception) -> None:
        try:
            async with self.lock:
                await self.pipeline.land_all()
                if not self.table.live(session) or self.slots.is_stored(session):
                    return
                self.scheduler.drop(session, Unavailable(f"session {session.id}: {failure}"))
                self.slots.unload(session)
        finally:
            self.diverged.discard(session.id)
        log_session(log, "unloaded", self.name, session.id, why=str(failure))

    def parked(self, session: Session, state: State) -> None:
        """A state went to the parking store: write it durably if it is due."""
        due = self.mode == "park" or session.logged_ops >= self.snapshot_every
        # Not mid-call (that state is not committed), nor while a commit of it is in flight:
        # the answers that commit holds are the session's only once it lands, and a snapshot
        # without them would make them dead records (a retry after a restart would run again).
        if (
            self.committer is not None
            and session.logged_ops
            and due
            and self.between_calls(session)
        ):
            self._snapshot(session, state)

    def _snapshot(self, session: Session, state: State) -> asyncio.Future[set[str]] | None:
        """Write the session in whole (None: not, its state here is not the store's). Its
        steps since count as written from now on; if the write fails, they count again, so
        that the next chance (a park, the drain's checkpoint) writes them."""
        assert self.committer is not None
        if session.id in self.diverged:
            return None
        unwritten, session.logged_ops = session.logged_ops, 0
        record = journal.snapshot(session, self.card.weights_digest, state)
        done = self.committer.commit([record])
        done.add_done_callback(partial(self._snapshot_landed, session, unwritten))
        return done

    def _snapshot_landed(
        self, session: Session, unwritten: int, done: asyncio.Future[set[str]]
    ) -> None:
        failure = commit_failure(session, done)
        if failure is None:
            return
        session.logged_ops += unwritten
        log.error(
            "session %s was not written in whole: %s", session.id, failure,
            extra={"event": "commit_failed", "session": session.id, "why": str(failure)},
        )  # fmt: skip

    async def snapshot_idle(self) -> None:
        """A few idle active sessions that are due, written in whole."""
        if self.committer is None or self.mode == "park":
            return
        due = [
            s for s in self.slots.active.values()
            if s.logged_ops >= self.snapshot_every and self.between_calls(s)
        ][:SNAPSHOTS_PER_SWEEP]  # fmt: skip
        if not due:
            return
        async with self.lock:
            await self.pipeline.land_all()
            for session in due:
                if session.slot is not None and self.between_calls(session):
                    self._snapshot(session, await self.worker.read(session.slot))

    def settled(self, session: Session) -> None:
        """Every commit of the session landed and was taken: write it in whole now if it is
        due. A session under steady load is rarely between calls when the expiry sweep looks,
        and one that moves to another replica replays every step since its last snapshot
        there (milliseconds each): so the snapshot follows its steps, not the sweep."""
        if self.committer is None or self.mode == "park" or session.id in self.snapshotting:
            return
        if session.logged_ops < self.snapshot_every:
            return
        task = asyncio.ensure_future(self._snapshot_settled(session))
        self.snapshotting[session.id] = task
        task.add_done_callback(lambda _: self.snapshotting.pop(session.id, None))

    async def _snapshot_settled(self, session: Session) -> None:
        try:
            async with self.lock:
                await self.pipeline.land_all()
                due = session.logged_ops >= self.snapshot_every and self.table.live(session)
                if due and session.slot is not None and self.between_calls(session):
                    self._snapshot(session, await self.worker.read(session.slot))
        except Exception as error:  # the worker went away: the engine hears of it itself
            log.warning("snapshot of session %s failed: %s", session.id, error,
                        extra={"event": "snapshot_failed"})  # fmt: skip

    def between_calls(self, session: Session) -> bool:
        """Whether the session's state is its committed one: no call of it has started and
        no commit of it is in flight (calls may be queued: a session under steady load
        always has one, and must still be written in whole now and then, or bringing it
        back would replay everything since it was last idle)."""
        queue = self.scheduler.queues.get(session.id)
        return not (queue and queue[0].started) and not self.committing[session.id]

    async def _state_of(self, session: Session) -> State:
        if session.slot is None:
            return self.slots.read(session)
        return await self.worker.read(session.slot)

    async def checkpoint(self) -> Checkpoint:
        """At drain: every session with steps since its last snapshot written in whole (none
        has calls any more). Returns how many were written, and how many could not be (a
        state that could not be read, a store that failed): each of those is logged."""
        if self.committer is None:
            return Checkpoint()
        writes: list[tuple[Session, asyncio.Future[set[str]]]] = []
        failed = 0
        async with self.lock:
            # The commits in flight (calls the drain cut short among them) land first, so
            # every snapshot carries the answers they hold.
            await self.committer.flush()
            for session in [*self.slots.active.values(), *self.slots.parked.values()]:
                if not (session.logged_ops and self.table.live(session)):
                    continue
                try:
                    state = await self._state_of(session)
                except Exception as error:  # its parked file is gone, the worker died
                    why = {"event": "checkpoint_failed", "session": session.id}
                    log.error(
                        "cannot read session %s to write it: %s", session.id, error, extra=why
                    )
                    failed += 1
                    continue
                done = self._snapshot(session, state)
                if done is not None:
                    writes.append((session, done))
        if writes:
            await asyncio.wait([done for _, done in writes])
        written = sum(commit_failure(session, done) is None for session, done in writes)
        return Checkpoint(written, failed + len(writes) - written)


def log_failure(done: asyncio.Future[set[str]]) -> None:
    """For commits nobody waits on: say when one failed."""
    if not done.cancelled() and done.exception() is not None:
        log.error("a background commit failed: %s", done.exception(),
                  extra={"event": "commit_failed"})  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    """What a drain's checkpoint did: sessions written in whole, and sessions it could not
    write (their steps since their last commit are lost if they were not committed)."""

    written: int = 0
    failed: int = 0

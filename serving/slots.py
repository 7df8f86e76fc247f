"""Which sessions of a model hold a slot of its state pool, which are parked, and moving
them between the two, in front of the parking store (`serving.store`).

Two ways a state moves:
- inside a launch (`place`, the scheduler's `Placement`): restoring a parked session for the
  launch being assembled, maybe parking another one for its slot. Both ride in the launch
  (`SlotMoves`): the worker reads the parked slot out, writes the restored state in, then
  steps, in that order. The parked state reaches the store when the launch lands
  (`landed`); until then the session is "in transit" and cannot be restored.
- outside a launch (`claim`, for a new, forked or imported session): the caller holds the
  engine's lock with no launch in flight, and an idle session is parked by reading its slot.

A new session never preempts a busy one: without an idle session to park it starts parked,
and its first call restores it (which may preempt: a busy session not in the launch is
parked between two of its calls' rows, so more busy sessions than slots take turns).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from serving.errors import ResourceExhausted
from serving.generation import GenerateCall
from serving.logs import log_session
from serving.metrics import Metrics
from serving.protocol import HostState, WriteSlot
from serving.sessions import Session, SessionTable
from serving.store import ParkingStore
from serving.worker import host_state
from serving.worker_client import WorkerClient

log = logging.getLogger("memserve.slots")

State = dict[str, torch.Tensor]


@dataclass
class SlotMoves:
    """The moves decided while assembling one launch, carried out by the worker in it."""

    park: list[tuple[Session, int]] = field(default_factory=list)  # session, slot it leaves
    restore: list[tuple[int, HostState]] = field(default_factory=list)  # slot, state to write
    save: list[tuple[GenerateCall, int]] = field(default_factory=list)  # a turn's state before

    def __bool__(self) -> bool:
        return bool(self.park or self.restore or self.save)


class SlotManager:
    """The slots of one model's pool and the sessions parked outside it."""

    def __init__(
        self,
        model: str,
        capacity: int,
        store: ParkingStore,
        worker: WorkerClient,
        busy: Callable[[Session], bool],
        flying: Callable[[Session], bool],
        table: SessionTable,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.table = table  # the parking store is shared: whose state it demoted
        self.store = store
        self.worker = worker
        self.busy = busy  # whether a session has calls queued
        self.flying = flying  # whether a session has rows in launches in flight
        self.metrics = metrics
        self.free = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.active: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.parked: dict[str, Session] = {}
        self.stored: dict[str, Session] = {}  # only in the session store: loaded when used
        self.outside: Counter[str] = Counter()  # parked or stored sessions, per tenant
        self.transit: set[str] = set()  # parked by a launch in flight, not yet in the store
        self.rollbacks: dict[str, State] = {}  # states to park instead of those in transit
        self.moves = SlotMoves()
        # A state just went to the parking store (the engine may write it durably).
        self.on_parked: Callable[[Session, State], None] = lambda session, state: None

    # ------------------------------------------------------------------ bookkeeping

    def touch(self, session: Session) -> None:
        """The session was just used: last in line to be parked."""
        if session.id in self.active:
            self.active.move_to_end(session.id)

    def residence(self, session: Session) -> str:
        """Where the session's state is: "active", "parked_host", "parked_disk" (a state in
        transit counts as host), or "stored" (only in the session store, brought back on
        its next call)."""
        if session.slot is not None:
            return "active"
        if session.id in self.parked:
            return self.store.residence(session.id) or "parked_host"  # or in transit
        return "stored"

    def count(self, residence: str) -> int:
        """How many sessions are `residence` (see `residence`)."""
        if residence == "active":
            return len(self.active)
        if residence == "stored":
            return len(self.stored)
        return sum(1 for s in list(self.parked.values()) if self.residence(s) == residence)

    def _attach(self, session: Session, slot: int) -> None:
        session.slot = slot
        if self.parked.pop(session.id, None) is not None:
            self.outside[session.tenant] -= 1
        self.active[session.id] = session

    def _detach(self, session: Session) -> int:
        slot = session.slot
        assert slot is not None
        session.slot = None
        del self.active[session.id]
        self.parked[session.id] = session
        self.outside[session.tenant] += 1
        return slot

    def victim(self, exclude: Collection[str] = (), idle_only: bool = False) -> Session | None:
        """Whom to park for a slot, outside `exclude` and with no row in flight: the least
        recently used idle session, else (unless `idle_only`) the least recently used busy
        one."""
        busy = None
        for session in self.active.values():
            if session.id in exclude or self.flying(session):
                continue
            if not self.busy(session):
                return session
            if busy is None and not idle_only:
                busy = session
        return busy

    # ------------------------------------------------------------------ inside a launch

    def in_transit(self, session: Session) -> bool:
        return session.id in self.transit

    def place(self, session: Session, launch: Collection[str]) -> bool:
        """Restore a parked session into a slot for the launch being assembled (see the
        module docstring); False if every slot is stepping in this launch."""
        victim = None if self.free else self.victim(exclude=launch)
        if victim is None and not self.free:
            return False
        state, source = self.store.unpark(session.id)  # raises before anything changed
        if victim is None:
            slot = self.free.pop()
        else:
            slot = self._detach(victim)
            self.moves.park.append((victim, slot))
            self.transit.add(victim.id)
        self.moves.restore.append((slot, host_state(state)))
        self._attach(session, slot)
        self.metrics.restores.labels(self.model, source).inc()
        log_session(log, "restored", self.model, session.id, source=source)
        return True

    def save(self, call: GenerateCall) -> None:
        """Read the state of the call's session in the launch being assembled, before its
        rows run (a Generate turn's state, to undo the turn if it does not finish)."""
        assert call.session.slot is not None
        self.moves.save.append((call, call.session.slot))

    def take_moves(self) -> SlotMoves:
        """The moves of the launch just assembled (and a clean slate for the next)."""
        moves, self.moves = self.moves, SlotMoves()
        return moves

    def landed(self, parked: list[tuple[Session, int]], states: tuple[HostState, ...]) -> None:
        """A launch that parked sessions landed: their states go to the store. A session
        that ended meanwhile is dropped; if the store refuses (the disk fails), the state
        stays in host memory over its budget rather than be lost."""
        for (session, _), arrays in zip(parked, states, strict=True):
            self.transit.discard(session.id)
            if self.parked.get(session.id) is not session:
                continue
            state = {name: torch.from_numpy(array) for name, array in arrays.items()}
            state = self.rollbacks.pop(session.id, state)
            try:
                self._store(session, state)
            except ResourceExhausted:
                log.exception(
                    "parking store refused a preempted session; kept in host memory",
                    extra={"event": "store_error", "model": self.model, "session": session.id},
                )
                self.store.host.put(session.id, state)

    def lost(self, parked: list[tuple[Session, int]]) -> None:
        """A launch that parked sessions failed: their states are gone with it."""
        for session, _ in parked:
            self.transit.discard(session.id)
            self.rollbacks.pop(session.id, None)

    def rollback(self, session: Session, state: State) -> None:
        """Put back a session's state from before a turn, wherever the state is now: into
        its slot (sent at once: the pipe keeps it behind every launch already sent), over its
        parked state, or over the state a launch in flight is parking."""
        if session.slot is not None:
            answer = self.worker.send(WriteSlot(session.slot, host_state(state)))
            answer.add_done_callback(_log_failure)
        elif session.id in self.transit:
            self.rollbacks[session.id] = state
        elif session.id in self.parked:
            self.store.park(session.id, state)

    # ------------------------------------------------------------------ outside a launch

    async def claim(self, keep: Collection[str] = ()) -> int | None:
        """A slot for a new session: a free one, else one freed by parking the least
        recently used idle session not in `keep`; None if every active session is busy.
        The caller holds the engine's lock and has landed every launch. RESOURCE_EXHAUSTED
        (nothing changed) if the store cannot take the idle session's state."""
        if self.free:
            return self.free.pop()
        victim = self.victim(exclude=keep, idle_only=True)
        if victim is None:
            return None
        assert victim.slot is not None
        self._store(victim, await self.worker.read(victim.slot))  # may refuse: still active
        return self._detach(victim)

    def unclaim(self, slot: int) -> None:
        """Give back a claimed slot that was not used (the worker refused the state)."""
        self.free.append(slot)

    def add_active(self, session: Session, slot: int) -> None:
        self._attach(session, slot)

    def add_parked(self, session: Session, state: State) -> None:
        """A new session that starts parked."""
        self._store(session, state, count=False)
        self.parked[session.id] = session
        self.outside[session.tenant] += 1

    def add_stored(self, session: Session) -> None:
        """A session whose state is only in the session store (after a restart)."""
        self.stored[session.id] = session
        self.outside[session.tenant] += 1

    def is_stored(self, session: Session) -> bool:
        return session.id in self.stored

    def unstore(self, session: Session, state: State) -> None:
        """A stored session's state, brought back: parked until its call restores it."""
        del self.stored[session.id]
        self.store.park(session.id, state)
        self.parked[session.id] = session

    def unload(self, session: Session) -> None:
        """Forget the session's state here (its commit failed: what is here is ahead of the
        store), so that its next use brings it back from the session store."""
        self.release(session)
        self.stored[session.id] = session
        self.outside[session.tenant] += 1

    def read(self, session: Session) -> State:
        """A copy of a parked session's state (fork, export); active ones are read from the
        worker."""
        return self.store.peek(session.id)

    def release(self, session: Session) -> None:
        """A session ended: free its slot, or forget its parked state."""
        self.rollbacks.pop(session.id, None)
        if self.stored.pop(session.id, None) is not None:
            self.outside[session.tenant] -= 1
            return
        if session.slot is not None:
            self.free.append(session.slot)
            session.slot = None
            self.active.pop(session.id, None)
            return
        if self.parked.pop(session.id, None) is not None:
            self.outside[session.tenant] -= 1
        try:
            self.store.delete(session.id)
        except OSError:  # the file stays behind; the session ends regardless
            log.exception(
                "could not delete a parked state",
                extra={"event": "store_error", "model": self.model, "session": session.id},
            )

    def _store(self, session: Session, state: State, count: bool = True) -> None:
        """Into the parking store, counting and logging the park (and any demotions)."""
        for demoted in self.store.park(session.id, state):
            owner = self.table.sessions.get(demoted)
            model = self.model if owner is None else owner.model
            self.metrics.evictions.labels(model, "parked_disk").inc()
        if count:
            residence = self.store.residence(session.id) or "parked_host"
            self.metrics.evictions.labels(self.model, residence).inc()
            log_session(log, "parked", self.model, session.id, residence=residence)
            self.on_parked(session, state)


def _log_failure(answer: asyncio.Future[None]) -> None:
    if not answer.cancelled() and answer.exception() is not None:
        log.error(
            "putting a state back failed",
            exc_info=answer.exception(),
            extra={"event": "rollback_failed"},
        )

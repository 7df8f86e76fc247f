"""A session's life outside its calls: create, fork, import, export, delete and expiry.

Each of these holds the engine's lock and first lands every launch in flight, so the
session's step count includes all its rows and no launch runs while a slot is claimed,
filled or read. A new session's state never crosses the pipe when it gets a slot: the worker
resets the slot (create) or copies the parent's (fork); only imports and exports carry a
state, and a fork of a session while every slot is busy (the child starts parked with a copy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from models.state import validate_state
from serving.errors import FailedPrecondition, InvalidArgument
from serving.export import ImportedState, export_state
from serving.logs import log_session
from serving.metrics import Metrics
from serving.pipeline import Pipeline
from serving.protocol import ModelCard
from serving.scheduler import Scheduler
from serving.sessions import Session, SessionTable, new_session_id
from serving.slots import SlotManager, State

log = logging.getLogger("memserve.lifecycle")


class Lifecycle:
    """The sessions of one model: where they begin and end."""

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

    def check_ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.default_ttl
        if not (np.isfinite(ttl) and 0 < ttl <= self.max_ttl):
            raise InvalidArgument(f"ttl_seconds must be > 0 and <= {self.max_ttl:g}, got {ttl}")
        return ttl

    async def create(self, ttl: float | None, seed: int | None) -> Session:
        """A new session at step 0 in the model's initial state."""
        session = self._new_session(self.check_ttl(ttl), step=0, seed=seed)
        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, self.worker.reset, self._initial_state)
        log_session(log, "created", self.name, session.id, residence=self.slots.residence(session))
        return session

    async def fork(self, parent: Session, ttl: float | None) -> Session:
        """A new session holding a copy of `parent`'s state and step count."""
        ttl = self.check_ttl(ttl) if ttl is not None else parent.ttl
        async with self.lock:
            await self.pipeline.land_all()  # the parent's count must include its rows in flight
            self.table.check_live(parent)
            child = self._new_session(ttl, step=parent.step, seed=parent.seed)
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
        log_session(log, "forked", self.name, child.id, parent=parent.id)
        return child

    async def import_(self, imported: ImportedState, ttl: float | None) -> Session:
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
        state = imported.tensors
        session = self._new_session(ttl, step=imported.step, seed=None)

        async def write(slot: int) -> None:
            await self.worker.write(slot, state)

        async def given() -> State:
            return state

        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, write, given)
        log_session(log, "imported", self.name, session.id, step=session.step)
        return session

    async def export(self, session: Session) -> tuple[bytes, int]:
        """The session's state as safetensors bytes, with its step count."""
        async with self.lock:
            await self.pipeline.land_all()  # the count must include the rows in flight
            self.table.check_live(session)
            if session.slot is None:
                state = self.slots.read(session)
            else:
                state = await self.worker.read(session.slot)
            step = session.step
        return export_state(state, self.name, self.card.weights_digest, step), step

    async def delete(self, session: Session) -> None:
        """End a session; calls still queued for it are answered NOT_FOUND."""
        async with self.lock:
            self.table.check_live(session)
            self.end(session, "was deleted")
        log_session(log, "deleted", self.name, session.id)

    async def expire(self) -> None:
        """End the sessions idle for longer than their TTL (none with calls queued)."""
        now = time.monotonic()
        sessions = (*self.slots.active.values(), *self.slots.parked.values())
        expired = [s for s in sessions if now - s.last_used > s.ttl]
        if not expired:
            return
        async with self.lock:
            for session in expired:
                if self.scheduler.has_calls(session) or not self.table.live(session):
                    continue
                self.end(session, f"expired after {session.ttl:g} s idle")
                self.metrics.evictions.labels(self.name, "expired").inc()
                log_session(log, "expired", self.name, session.id)

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

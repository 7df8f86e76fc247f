"""A session's life outside its calls: create, fork, import, export, delete, expiry, each
committed to the session store before its reply (`serving.persistence` keeps the rest of a
session's records).

Each of create .. export holds the engine's lock and first lands every launch in flight, so
the session's step count includes all its rows and no launch runs while a slot is claimed,
filled or read. A new session's state crosses the pipe only when it must: the worker resets
the slot (create) or copies the parent's (fork); an import writes its state, an export reads
one, a fork reads the child's to commit it (durable stores only) or when every slot is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from models.state import complete_state, validate_state
from serving import journal
from serving.durable.committer import Committer
from serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from serving.export import ImportedState, export_state
from serving.logs import log_session
from serving.metrics import Metrics
from serving.persistence import Persistence, log_failure
from serving.pipeline import Pipeline
from serving.protocol import ModelCard
from serving.requests import RequestLog, scoped
from serving.scheduler import Scheduler
from serving.sessions import Session, SessionTable, new_session_id
from serving.slots import SlotManager, State
from serving.tenants import OPEN_TENANT, Tenant

log = logging.getLogger("memserve.lifecycle")


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
        persistence: Persistence,
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
        self.persistence = persistence
        self.committer: Committer | None = persistence.committer
        self.recent = persistence.recent
        # Bounds shared by every model, and a tenant's state bytes outside the slots (the
        # engine's sum over models), set by the engine.
        self.max_sessions = 1_000_000
        self.parked_bytes: Callable[[str], int] = lambda tenant: 0

    def check_ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.default_ttl
        if not (np.isfinite(ttl) and 0 < ttl <= self.max_ttl):
            raise InvalidArgument(f"ttl_seconds must be > 0 and <= {self.max_ttl:g}, got {ttl}")
        return ttl

    # ------------------------------------------------------------------ beginnings

    async def create(
        self,
        ttl: float | None,
        seed: int | None,
        tenant: Tenant = OPEN_TENANT,
        request_id: str = "",
        digest: bytes = b"",
    ) -> Session:
        """A new session at step 0 in the model's initial state."""
        made = partial(self._create, ttl, seed, tenant, request_id, digest)
        return await self._under_id(tenant, request_id, digest, made)

    async def _create(
        self, ttl: float | None, seed: int | None, tenant: Tenant, request_id: str, digest: bytes
    ) -> Session:
        self._check_room(tenant)
        session = self._new_session(self.check_ttl(ttl), step=0, seed=seed, tenant=tenant)
        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, self.worker.reset, self._initial_state)
        await self._commit_made(session, None, request_id, digest)
        log_session(log, "created", self.name, session.id, residence=self.slots.residence(session))
        await self._hand_over(session)
        return session

    async def fork(
        self,
        parent: Session,
        ttl: float | None,
        tenant: Tenant = OPEN_TENANT,
        request_id: str = "",
        digest: bytes = b"",
    ) -> Session:
        """A new session holding a copy of `parent`'s state and step count."""
        made = partial(self._fork, parent, ttl, tenant, request_id, digest)
        return await self._under_id(tenant, request_id, digest, made)

    async def _fork(
        self, parent: Session, ttl: float | None, tenant: Tenant, request_id: str, digest: bytes
    ) -> Session:
        self._check_room(tenant)
        ttl = self.check_ttl(ttl) if ttl is not None else parent.ttl
        await self.persistence.ensure_loaded(parent)
        async with self.lock:
            await self.pipeline.land_all()  # the parent's count must include its rows in flight
            self.table.check_live(parent)
            child = self._new_session(ttl, step=parent.step, seed=parent.seed, tenant=tenant)
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
        await self._hand_over(child)
        return child

    async def import_(
        self,
        imported: ImportedState,
        ttl: float | None,
        tenant: Tenant = OPEN_TENANT,
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
        imported = replace(
            imported, tensors=complete_state(self.card.state_specs, imported.tensors)
        )
        try:
            validate_state(self.card.state_specs, imported.tensors)
        except ValueError as error:
            raise InvalidArgument(f"state does not fit model {self.name!r}: {error}") from error
        made = partial(self._import, imported, ttl, tenant, request_id, digest)
        return await self._under_id(tenant, request_id, digest, made)

    async def _import(
        self,
        imported: ImportedState,
        ttl: float,
        tenant: Tenant,
        request_id: str,
        digest: bytes,
    ) -> Session:
        self._check_room(tenant)
        state = imported.tensors
        session = self._new_session(ttl, step=imported.step, seed=None, tenant=tenant)

        async def write(slot: int) -> None:
            await self.worker.write(slot, state)

        async def given() -> State:
            return state

        async with self.lock:
            await self.pipeline.land_all()
            await self._place(session, write, given)
        await self._commit_made(session, state, request_id, digest)
        log_session(log, "imported", self.name, session.id, step=session.step)
        await self._hand_over(session)
        return session

    async def _under_id(
        self,
        tenant: Tenant,
        request_id: str,
        digest: bytes,
        make: Callable[[], Awaitable[Session]],
    ) -> Session:
        """`make()` a session once per request id (`RecentSessions.once`). Ids are the
        tenant's: another tenant's same id is another request."""
        if not request_id:
            return await make()
        return await self.recent.once(
            scoped(tenant.name, request_id),
            digest,
            make,
            lambda session_id: self.table.get(session_id, tenant.name),
        )

    def _check_room(self, tenant: Tenant) -> None:
        """RESOURCE_EXHAUSTED, naming the bound, if one more session is too many: for the
        server (max_sessions), or for the tenant (its quotas)."""
        if len(self.table) >= self.max_sessions:
            raise ResourceExhausted(
                f"the server holds {len(self.table)} sessions, the most it takes (max_sessions)"
            )
        parked = self.parked_bytes(tenant.name) + self.card.state_bytes
        tenant.check_room(self.table.per_tenant[tenant.name], parked)

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
        except Exception:
            async with self.lock:
                if self.table.live(session):
                    self.end(session, "could not be committed")
            raise

    async def _hand_over(self, session: Session) -> None:
        """A cluster replica keeps no session it made: its calls go to the replica its id
        hashes to, which brings it back from the store (docs/cluster.md)."""
        if self.persistence.replica:
            async with self.lock:
                if self.table.live(session):
                    self.persistence.forget(session, "was made here and handed to the store")

    # ------------------------------------------------------------------ reading, ending

    async def export(self, session: Session) -> tuple[bytes, int]:
        """The session's state as safetensors bytes, with its step count."""
        await self.persistence.ensure_loaded(session)
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
        """End the sessions idle for longer than their TTL (none with calls queued). A
        cluster replica only forgets them: the shared store's own expiry ends them, which the
        replica restarts for the sessions it is serving (`Persistence.keep_alive`)."""
        now = time.monotonic()
        slots = self.slots
        candidates = (*slots.active.values(), *slots.parked.values(), *slots.stored.values())
        loading = self.persistence.loading  # used now: its call waits for it
        expired = [s for s in candidates if now - s.last_used > s.ttl and s.id not in loading]
        if expired:
            async with self.lock:
                records = []
                for session in expired:
                    if self.scheduler.has_calls(session) or not self.table.live(session):
                        continue
                    why = f"expired after {session.ttl:g} s idle"
                    if self.persistence.replica:
                        self.persistence.forget(session, f"idle here for {session.ttl:g} s")
                        continue
                    self.end(session, why)
                    records.append(journal.deleted(session, why))
                    self.metrics.evictions.labels(self.name, "expired").inc()
                    log_session(log, "expired", self.name, session.id)
            if records and self.committer is not None:
                self.committer.commit(records).add_done_callback(log_failure)
        committing = self.persistence.committing
        self.persistence.keep_alive(
            s for s in candidates if self.scheduler.has_calls(s) or committing[s.id]
        )
        await self.persistence.snapshot_idle()

    # ------------------------------------------------------------------ helpers

    def _new_session(self, ttl: float, step: int, seed: int | None, tenant: Tenant) -> Session:
        return Session(
            id=new_session_id(),
            model=self.name,
            ttl=ttl,
            last_used=time.monotonic(),
            step=step,
            seed=seed,
            tenant=tenant.name,
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

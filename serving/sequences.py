"""Triton's sequence ids as names of memserve sessions (the v2 API, `serving.kserve`).

A v2 client names its sequence itself (`sequence_id`: an integer or a string); each START
gets a new session, and `Sequences` remembers which session a name means. A name is keyed by
(tenant, model, id): ids are chosen by clients, so they are names within a tenant, never
capabilities (the session id, which the START's response carries, is the capability). On an
open server every caller is the tenant "". A name never reaches another tenant's session:
a string id that is a session id of another tenant is answered as an id never made.

Durable with the sessions: a START creates its session under a request id that carries the
name's key (`kserve-seq:<key>:<nonce>`, `creation_request_id`), and the session store keeps
a session's creation request id with it for as long as the session lives
(`SessionSummary.request_id`). A server started on that store learns every name again from
it (`adopt`), so a sequence started before a restart goes on after it; nothing else is
written. The nonce comes from the START's own request id (so that a retried START finds the
session it made) or is random.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.engine import ModelEngine
from serving.errors import InvalidArgument, NotFound
from serving.logs import log_session
from serving.sessions import Session, SessionTable
from serving.tenants import Tenant

log = logging.getLogger("memserve.sequences")

SequenceId = int | str  # 1 and "1" are different sequences, as in Triton

PREFIX = "kserve-seq:"
KEY_CHARACTERS = 32  # 128 bits of SHA-256, hex


@functools.lru_cache(maxsize=65536)  # a sequence's key is asked for at every request
def sequence_key(tenant: str, model: str, sequence_id: SequenceId) -> str:
    """What a name is looked up by: a digest of (tenant, model, kind, id), so that ids of any
    length fit in a request id, and the tenant is part of it."""
    kind = "int" if isinstance(sequence_id, int) else "str"
    payload = "\0".join((tenant, model, kind, str(sequence_id))).encode()
    return hashlib.sha256(payload).hexdigest()[:KEY_CHARACTERS]


def creation_request_id(key: str, request_id: str) -> str:
    """The request id a START's session is created under: the name's key, then a nonce
    derived from the START's own request id (a retry makes no second session) or random."""
    if request_id:
        nonce = hashlib.sha256(request_id.encode()).hexdigest()[:16]
    else:
        nonce = secrets.token_hex(8)
    return f"{PREFIX}{key}:{nonce}"


def key_of(request_id: str) -> str | None:
    """The name's key in a creation request id, or None if it is not a START's."""
    if not request_id.startswith(PREFIX):
        return None
    key, _, nonce = request_id[len(PREFIX) :].partition(":")
    return key if len(key) == KEY_CHARACTERS and nonce else None


@dataclass
class Binding:
    session_id: str
    made: float  # time.time() when the session was made: the newest START wins


class Sequences:
    """Which session each sequence name means, across the server's models."""

    def __init__(self, prune_above: int = 4096) -> None:
        self.bound: dict[str, Binding] = {}
        self.prune_above = prune_above
        self.minimum_prune = prune_above

    def find(self, key: str) -> str | None:
        """The session id the name was last bound to (it may have ended since)."""
        binding = self.bound.get(key)
        return None if binding is None else binding.session_id

    def bind(self, key: str, session_id: str, made: float) -> str | None:
        """The name now means this session (unless a later START's is bound already).
        Returns the session it meant before, if another."""
        previous = self.bound.get(key)
        if previous is not None and previous.made > made:
            return None
        self.bound[key] = Binding(session_id, made)
        if previous is None or previous.session_id == session_id:
            return None
        return previous.session_id

    def adopt(self, request_id: str, session_id: str, made: float) -> bool:
        """A session found in the session store: bind its name if a START made it."""
        key = key_of(request_id)
        if key is None:
            return False
        self.bind(key, session_id, made)
        return True

    def prune(self, live: Callable[[str], bool]) -> None:
        """Forget the names whose sessions ended, once there are many of them. Names stay
        bound after their session ends so that a late request is told why."""
        if len(self.bound) <= self.prune_above:
            return
        self.bound = {key: b for key, b in self.bound.items() if live(b.session_id)}
        self.prune_above = max(self.minimum_prune, 2 * len(self.bound))

    def __len__(self) -> int:
        return len(self.bound)


class SequenceSessions:
    """What the sequence flags do to sessions (Triton's semantics): START makes one, a
    request without it finds the name's, END deletes it."""

    def __init__(self, engines: dict[str, ModelEngine], table: SessionTable) -> None:
        self.engines = engines
        self.table = table
        self.names = Sequences()

    async def session(
        self, engine: ModelEngine, tenant: Tenant, sequence_id: SequenceId, start: bool,
        request_id: str,
    ) -> Session:  # fmt: skip
        """START: a new session, bound to the name (a session the name meant before is
        ended, as Triton ends a sequence that a START interrupts). Else: the name's session,
        or the session whose id the (string) name is; Triton's INVALID_ARGUMENT otherwise."""
        key = sequence_key(tenant.name, engine.name, sequence_id)
        if start:
            made = creation_request_id(key, request_id)
            session = await engine.lifecycle.create(None, None, tenant, made, b"")
            previous = self.names.bind(key, session.id, time.time())
            self.names.prune(lambda session_id: session_id in self.table.sessions)
            if previous is not None:
                await self._end_interrupted(previous, session)
            return session
        bound = self.names.find(key)
        found = self.table.sessions.get(bound) if bound is not None else None
        if bound is None and isinstance(sequence_id, str):
            found = self.table.sessions.get(sequence_id)  # a session made by memserve.v1
            if found is not None and found.tenant != tenant.name:
                found = None  # another tenant's: as if it never existed
            if found is not None and found.model != engine.name:
                raise InvalidArgument(
                    f"sequence_id {sequence_id!r} is a session of model '{found.model}', "
                    f"not '{engine.name}'"
                )
        if found is None:
            session_id = bound or (sequence_id if isinstance(sequence_id, str) else "")
            owner, why = self.table.ended.get(session_id, ("", "")) if session_id else ("", "")
            if owner != tenant.name:
                why = ""
            raise InvalidArgument(
                f"inference request for sequence {sequence_id} to model '{engine.name}' must "
                "specify the START flag on the first request of the sequence"
                + (f" (its session {session_id} {why})" if why else "")
            )
        return found

    async def end(self, engine: ModelEngine, session: Session) -> None:
        """END: the session is deleted, after its request's step. The name stays bound to
        it, so that a later request is told the session was deleted."""
        with contextlib.suppress(NotFound):  # ended meanwhile (deleted, expired)
            await engine.lifecycle.delete(session)

    async def _end_interrupted(self, session_id: str, successor: Session) -> None:
        session = self.table.sessions.get(session_id)
        if session is not None:
            await self.end(self.engines[session.model], session)
            log_session(log, "interrupted", session.model, session_id, successor=successor.id)

"""Sessions: what the server keeps per conversation, and the table that finds them by id.

A session's tensors live in one slot of its model's state pool while it is active, or in
the parking store while it is parked; its step count always says how many steps its state
has taken. The engine of the session's model changes all of this; the table only maps ids
to sessions and remembers recently ended ones so NOT_FOUND can say why.
"""

from __future__ import annotations

import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from serving.errors import InvalidArgument, NotFound, ServingError
from serving.requests import RequestLog


def new_session_id() -> str:
    """128 random bits, as 32 hex digits."""
    return secrets.token_hex(16)


@dataclass(eq=False)
class Session:
    """One session of one model."""

    id: str
    model: str
    ttl: float  # seconds idle before it expires
    last_used: float  # time.monotonic() of its last completed request
    touched: float = 0.0  # when a cluster replica last restarted its expiry in the store
    step: int = 0  # steps its state has taken
    slot: int | None = None  # its slot in the pool; None while parked
    seed: int | None = None
    tenant: str = ""  # who made it; only they reach it ("" on a server without keys)
    requests: RequestLog = field(default_factory=RequestLog)  # its recent request ids
    logged_ops: int = 0  # steps run since its state was last written in whole
    broken: ServingError | None = None  # why it cannot be served (a damaged store entry)


class SessionTable:
    """Every live session of the server by id, across models and tenants."""

    def __init__(self, remember_ended: int = 65536) -> None:
        self.sessions: dict[str, Session] = {}
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (tenant, why)
        self.remember_ended = remember_ended
        self.per_tenant: Counter[str] = Counter()  # live sessions of each tenant

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.per_tenant[session.tenant] += 1

    def remove(self, session: Session, why: str) -> None:
        """Forget a session; later lookups answer NOT_FOUND saying `why` (e.g. "expired")."""
        if self.sessions.pop(session.id, None) is session:
            self.per_tenant[session.tenant] -= 1
        self.ended[session.id] = (session.tenant, why)
        while len(self.ended) > self.remember_ended:
            self.ended.popitem(last=False)

    def forget(self, session: Session) -> None:
        """Drop a session from this server only: it goes on in the shared store, where any
        replica, this one too, finds it again (cluster replicas)."""
        if self.sessions.pop(session.id, None) is session:
            self.per_tenant[session.tenant] -= 1

    def live(self, session: Session) -> bool:
        """Whether `session` is still in the table (not ended since it was looked up)."""
        return self.sessions.get(session.id) is session

    def check_live(self, session: Session) -> None:
        """NOT_FOUND, saying why, if the session ended since it was looked up."""
        if not self.live(session):
            self.get(session.id, session.tenant)  # raises, saying why

    def get(self, session_id: str, tenant: str = "") -> Session:
        """The live session `session_id` of `tenant`. Another tenant's session, live or
        ended, answers exactly as an id that never existed: the same code and message."""
        session = self.sessions.get(session_id)
        if session is not None and session.tenant == tenant:
            return session
        if not session_id:
            raise InvalidArgument("session_id is empty")
        owner, why = self.ended.get(session_id, ("", ""))
        if why and owner == tenant:
            raise NotFound(f"session {session_id} {why}")
        raise NotFound(f"no session {session_id!r} on this server")

    def __len__(self) -> int:
        return len(self.sessions)

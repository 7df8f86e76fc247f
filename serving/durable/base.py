"""What a session store is: where a session's committed history lives, so that a server
started again on it finds every session as it was acknowledged.

A store keeps, per session, the record that began it (`SessionCreated`), its latest
`Snapshot` and the `CallCommitted` records after that snapshot: the session's state at its
committed step is the snapshot (or its initial state) with those calls' operations replayed,
which gives the same bits because the model is deterministic and batch-invariant. A commit
says "from step n to step n+k" and a store refuses one whose n is not the committed step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from protos import journal_pb2
from serving.errors import Unavailable

# Responses kept per session for retries of their request ids (docs/serving.md).
RESPONSES_KEPT = 16


class StoreUnavailable(Unavailable):
    """The store cannot be reached or written (Redis down, disk failing); nothing of the
    failed commit is acknowledged."""

    @classmethod
    def unusable(cls, where: str, why: object) -> StoreUnavailable:
        """The one wording of a store (named by its URL) that failed as `why` says."""
        return cls(f"the session store {where} cannot be used: {why}")


@dataclass
class StoredSession:
    """Everything a store keeps of one session, to bring it back."""

    created: journal_pb2.SessionCreated
    step: int  # the committed step
    snapshot: journal_pb2.Snapshot | None
    calls: list[journal_pb2.CallCommitted]  # after the snapshot (or the creation), in order
    responses: list[journal_pb2.Response] = field(default_factory=list)  # oldest first


@dataclass(frozen=True)
class SessionSummary:
    """What a server needs of a stored session at start (its state comes later, lazily)."""

    session_id: str
    model: str
    weights_digest: str
    ttl: float
    seed: int | None
    step: int
    error: str | None = None  # why it cannot be brought back, if it cannot
    request_id: str = ""  # of the call that made it, for that call's retries
    request_digest: bytes = b""
    made: float = 0.0  # time.time() when it was made
    tenant: str = ""  # who made it


class SessionStore(ABC):
    """The committed history of every session of a server (of a cluster, if `shared`)."""

    durable: bool = True
    shared: bool = False  # whether several servers may use it at once (replicas)
    commits_on_loop: bool = False  # whether it commits through `commit_on_loop`

    @abstractmethod
    def sessions(self) -> list[SessionSummary]:
        """Every session the store holds (not deleted), as of the last commit."""

    def summary(self, session_id: str) -> SessionSummary | None:
        """One session's summary (None if the store does not hold it)."""
        return next((s for s in self.sessions() if s.session_id == session_id), None)

    def committed_step(self, session_id: str) -> int | None:
        """The session's committed step (None if the store does not hold it)."""
        found = self.summary(session_id)
        return None if found is None else found.step

    def owner(self, session_id: str) -> tuple[int, str] | None:
        """The session's committed step and the replica that last committed or claimed it
        (a store that is not shared has no owners: "")."""
        step = self.committed_step(session_id)
        return None if step is None else (step, "")

    def claim(self, session_id: str) -> int | None:
        """Record this server as the session's owner; its committed step (None: absent)."""
        return self.committed_step(session_id)

    def touch(self, session_ids: Sequence[str]) -> None:
        """Restart the expiry of sessions in use (a call longer than their TTL must not see
        them expire), for a store that expires sessions itself; others have nothing to do."""
        return None

    @abstractmethod
    def load(self, session_id: str) -> StoredSession:
        """A session's records (KeyError if absent; serving.errors.DataLoss if damaged)."""

    @abstractmethod
    def commit(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        """Write `records` durably, in one write (one fsync, one Redis round trip), and
        return the ids of sessions whose records were refused: a call from a step that is
        not the session's committed one, a snapshot older than its latest, a record of a
        session the store does not hold; a refused record refuses the rest of its session's
        in the batch. A snapshot ahead of the committed step (a session whose calls are not
        logged) moves it there. StoreUnavailable if nothing could be written."""

    async def commit_on_loop(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        """`commit` as a round trip the event loop waits on itself, for a store where
        `commits_on_loop` (the committer's thread costs more than the wait: Redis)."""
        raise NotImplementedError(f"{type(self).__name__} commits in the committer's thread")

    async def probe_on_loop(self) -> None:
        """`probe` of what `commit_on_loop` uses, for a store where `commits_on_loop`."""
        raise NotImplementedError(f"{type(self).__name__} commits in the committer's thread")

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds open."""

    @abstractmethod
    def probe(self) -> None:
        """StoreUnavailable unless the store can be written now (after a failure)."""

    def problems(self) -> list[str]:
        """Damage found when the store was opened (for the log)."""
        return []


class MemorySessionStore(SessionStore):
    """Nothing survives the process: the default, and today's behaviour."""

    durable = False

    def sessions(self) -> list[SessionSummary]:
        return []

    def load(self, session_id: str) -> StoredSession:
        raise KeyError(session_id)

    def commit(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        return set()

    def close(self) -> None:
        return None

    def probe(self) -> None:
        return None


def record_session(record: journal_pb2.Record) -> str:
    """The id of the session a record is about."""
    kind = record.WhichOneof("record")
    if kind is None:
        raise ValueError("an empty record")
    if kind == "written":
        raise ValueError("the end of a write, of no session")
    session_id: str = getattr(record, kind).session_id
    return session_id

"""One replica of a cluster (`--replica NAME`): several servers share one redis:// session
store, and any of them serves any session by bringing it back from the store.

- A call for a session this replica does not hold finds it in the store (`find`): so a
  session is never stranded, and a client that does not send the routing header is served
  too, only slower. Envoy routes each session's calls to one replica (docs/cluster.md).
- A replica holds a session only while it serves it: a new one is committed and forgotten
  here (its calls go to the replica its id hashes to), and one idle for its TTL is
  forgotten here, not deleted: the store's own expiry ends it, for every replica at once.
- Two replicas never both advance a session: a commit names the step it starts from and the
  store refuses one that is not the committed step; the loser drops its copy (answers
  UNAVAILABLE, and the retry lands where the session is). A read (GetSession, Export, Fork)
  first checks that this replica is still the session's owner in the store (the last to
  commit or load it) at the step it holds (`check`), and brings it back if not.
"""

from __future__ import annotations

import asyncio

from serving.durable.committer import Committer
from serving.engine import ModelEngine
from serving.errors import NotFound
from serving.sessions import Session, SessionTable


class Replica:
    """This server's part in a cluster."""

    def __init__(
        self, name: str, committer: Committer, engines: dict[str, ModelEngine], table: SessionTable
    ) -> None:
        self.name = name
        self.committer = committer
        self.store = committer.store
        self.engines = engines
        self.table = table
        self.finding: dict[str, asyncio.Future[Session | None]] = {}

    async def find(self, session_id: str) -> Session | None:
        """The session from the shared store, adopted here (None if the store does not hold
        it, or holds it for a model this replica does not serve)."""
        finding = self.finding.get(session_id)
        if finding is None:
            finding = self.finding[session_id] = asyncio.ensure_future(self._find(session_id))
            finding.add_done_callback(lambda _: self.finding.pop(session_id, None))
        return await asyncio.shield(finding)

    async def _find(self, session_id: str) -> Session | None:
        summary = await self.committer.run(self.store.summary, session_id)
        engine = None if summary is None else self.engines.get(summary.model)
        if summary is None or engine is None:
            return None
        held = self.table.sessions.get(session_id)  # found meanwhile by another call
        return held if held is not None else engine.persistence.adopt(summary)

    async def check(self, session: Session, engine: ModelEngine) -> Session:
        """The session as the store has it: this copy if this replica still owns it at its
        step (or is advancing it now), else the store's, brought back (NOT_FOUND if gone)."""
        busy = engine.scheduler.has_calls(session) or engine.answers.committing[session.id]
        if busy or engine.slots.is_stored(session):
            return session  # ours, in progress; or not loaded yet: it loads fresh
        owner = await self.committer.run(self.store.owner, session.id)
        if owner is not None and owner == (session.step, self.name):
            return session
        async with engine.lock:
            engine.persistence.forget(session, "is held by another replica now")
        found = None if owner is None else await self.find(session.id)
        if found is None:
            self.table.get(session.id, session.tenant)  # raises as for an id never made
            raise NotFound(f"no session {session.id!r} on this server")
        return found

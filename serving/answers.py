"""How a finished call is answered (the scheduler's `on_finish`).

- A Generate turn that did not finish (failed, cancelled, its caller gone) is undone: the
  session's state and step count go back to what they were before the turn, so a retry
  starts clean.
- Otherwise, with a durable store, the call's operations (and its answer, when it has a
  request id) are committed: with `--durability launch` the caller is answered only once
  the commit is written, with `interval` at once while the commit follows in the
  background. Every call that finishes in one launch is committed by one write.
- A commit that fails or is refused is answered UNAVAILABLE, and its session is unloaded:
  what this server holds of it is ahead of the store, so its next call brings it back from
  the store, where a retry of the failed call finds it as it was before.
- The answer is kept for the call's request id (`serving.requests`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from functools import partial

from serving import journal
from serving.calls import Call
from serving.durable.committer import Committer
from serving.errors import Cancelled, Unavailable
from serving.generation import GenerateCall
from serving.sessions import Session, SessionTable
from serving.slots import SlotManager

log = logging.getLogger("memserve.answers")


class Answers:
    """Answers the calls of one model's sessions as they finish."""

    def __init__(
        self,
        committer: Committer | None,
        durability: str,
        slots: SlotManager,
        table: SessionTable,
        unload: Callable[[Session, Exception], None],
    ) -> None:
        self.committer = committer
        self.wait_for_commit = durability == "launch"
        self.log_calls = committer is not None and durability in ("launch", "interval")
        self.slots = slots
        self.table = table
        self.unload = unload  # forget a session whose commit failed (the engine's)
        self.committing: Counter[str] = Counter()  # commits in flight, per session
        # A session's commits all landed, the last one taken: its state is the store's
        # (the persistence's `settled`, which writes it in whole when it is due).
        self.on_settled: Callable[[Session], None] = lambda session: None

    def finished(self, call: Call) -> None:
        session = call.session
        self.slots.touch(session)
        unfinished = call.error is not None or call.abandoned
        if isinstance(call, GenerateCall) and call.started and unfinished:
            self._undo_turn(call)
            self._reply(call, call.error or Cancelled("the caller left: the turn was undone"))
            return
        if self.committer is None:  # nothing is committed (`--store memory`)
            self._reply(call)
            return
        live = self.table.live(session) and not self.slots.is_stored(session)
        if live:
            session.logged_ops += len(call.ops)
        record = journal.call_committed(call) if self.log_calls and live else None
        if record is None:
            self._reply(call)
            return
        committed = self.committer.commit([record])
        self.committing[session.id] += 1
        committed.add_done_callback(partial(self._landed, session))
        if self.wait_for_commit:
            committed.add_done_callback(partial(self._committed, call, True))
        else:
            committed.add_done_callback(partial(self._committed, call, False))
            self._reply(call)

    def _landed(self, session: Session, done: asyncio.Future[set[str]]) -> None:
        self.committing[session.id] -= 1
        if not self.committing[session.id]:
            del self.committing[session.id]
            if commit_failure(session, done) is None:
                self.on_settled(session)

    def _committed(self, call: Call, answer: bool, done: asyncio.Future[set[str]]) -> None:
        failure = commit_failure(call.session, done)
        if failure is None:
            if answer:
                self._reply(call)
            return
        log.error(
            "commit failed",
            extra={"event": "commit_failed", "session": call.session.id, "why": str(failure)},
        )
        if answer:
            self._reply(call, failure)
        self.unload(call.session, failure)

    def _undo_turn(self, call: GenerateCall) -> None:
        """Put the session back as it was before the turn: its state and its step count."""
        if call.before is not None:
            self.slots.rollback(call.session, call.before)
        call.session.step = call.from_step

    def _reply(self, call: Call, error: Exception | None = None) -> None:
        """Answer the caller (unless it left), and keep the answer for its request id."""
        session, error = call.session, error if error is not None else call.error
        if call.request_id:
            if error is None:
                answer = journal.response(call)
                assert answer is not None
                session.requests.finish(call.request_id, answer)
            else:
                session.requests.fail(call.request_id, error)
        future = call.future
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(call.result if call.result is not None else session.step)


def commit_failure(session: Session, done: asyncio.Future[set[str]]) -> Exception | None:
    """Why a commit of the session's records did not take, or None if it did."""
    if done.cancelled():
        return Unavailable("the server stopped before the call was committed")
    error = done.exception()
    if isinstance(error, Exception):
        return error
    if session.id in done.result():
        return Unavailable(
            f"the session store refused the commit of session {session.id}: it holds another "
            "step for it (another server advanced it); retry to continue from the store"
        )
    return None

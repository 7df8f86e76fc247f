"""How a finished call is answered (the scheduler's `on_finish`).

- A Generate turn that did not finish (failed, cancelled, its caller gone) is undone: the
  session's state and step count go back to what they were before the turn, so a retry
  starts clean.
- Otherwise, with a durable store, the call's operations (and its answer, when it has a
  request id) are committed: with `--durability launch` the caller is answered only once
  the commit is written, with `interval` at once while the commit follows in the
  background. The calls that finish in one launch are committed together, by one write
  (`landing`, which the pipeline lands each launch through).
- A commit that fails or is refused is answered UNAVAILABLE, and its session is unloaded:
  what this server holds of it is ahead of the store, so its next call brings it back from
  the store, where a retry of the failed call finds it as it was before.
- The answer is kept for the call's request id (`serving.requests`), also that of a Step
  cut short by a drain after it took steps (they stay taken): a repeat of its id is told
  where it stopped rather than running again. A call that failed otherwise leaves no trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from protos import journal_pb2
from serving import journal
from serving.calls import Call, StepCall
from serving.durable.committer import Committer
from serving.errors import Cancelled, Unavailable
from serving.generation import GenerateCall
from serving.protocol import steps_of
from serving.sessions import Session, SessionTable
from serving.slots import SlotManager

log = logging.getLogger("memserve.answers")


class Finished(NamedTuple):
    """A finished call, its record and its answer (with a request id), to be committed."""

    call: Call
    record: journal_pb2.Record
    answer: journal_pb2.Response | None


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
        self.finishing: list[Finished] = []  # finished calls not yet handed to the committer
        self.gathering = False  # in a landing: its calls are committed together at its end
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
            session.logged_ops += steps_of(call.ops)
        answer = journal.response(call)  # also a call cut short: a retry hears of it
        record = journal.call_committed(call, answer) if self.log_calls and live else None
        if record is None:
            self._reply(call, answer=answer)
            return
        self.finishing.append(Finished(call, record, answer))
        self.committing[session.id] += 1
        if not self.wait_for_commit:
            self._reply(call, answer=answer)
        if not self.gathering:  # finished outside a landing (dropped, failed): at once
            self._commit()

    def landing(self, land: Callable[[], None]) -> asyncio.Future[set[str]] | None:
        """Run `land` (a launch's landing, which finishes calls) and commit every call it
        finished in one write. Returns the write's future where their callers wait for it
        (`--durability launch`), else None."""
        self.gathering = True
        try:
            land()
        finally:
            self.gathering = False
        return self._commit()

    def _commit(self) -> asyncio.Future[set[str]] | None:
        if not self.finishing or self.committer is None:
            return None
        finished, self.finishing = self.finishing, []
        committed = self.committer.commit([item.record for item in finished])
        committed.add_done_callback(partial(self._committed, finished))
        return committed if self.wait_for_commit else None

    def _committed(self, finished: list[Finished], done: asyncio.Future[set[str]]) -> None:
        for call, _, answer in finished:
            session = call.session
            self.committing[session.id] -= 1
            settled = not self.committing[session.id]
            if settled:
                del self.committing[session.id]
            failure = commit_failure(session, done)
            if failure is None:
                if self.wait_for_commit:
                    self._reply(call, answer=answer)
                if settled:
                    self.on_settled(session)
                continue
            log.error(
                "commit failed",
                extra={"event": "commit_failed", "session": session.id, "why": str(failure)},
            )
            if self.wait_for_commit:
                self._reply(call, failure)
            self.unload(session, failure)

    def _undo_turn(self, call: GenerateCall) -> None:
        """Put the session back as it was before the turn: its state and its step count."""
        if call.before is not None:
            self.slots.rollback(call.session, call.before)
        call.session.step = call.from_step

    def _reply(
        self,
        call: Call,
        error: Exception | None = None,
        answer: journal_pb2.Response | None = None,
    ) -> None:
        """Answer the caller (unless it left), and keep the answer for its request id."""
        session, error = call.session, error if error is not None else call.error
        if call.request_id:
            if error is None or taken_and_cut_short(call, error):
                answer = answer or journal.response(call)
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


def taken_and_cut_short(call: Call, error: Exception) -> bool:
    """A Step cut short by a drain after it took steps: they stay taken and count."""
    return isinstance(error, Cancelled) and isinstance(call, StepCall) and call.done > 0

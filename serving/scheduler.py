"""Which calls go into the next launch: per-session queues served round robin.

A plain object (vLLM's scheduler is the model): `add` queues a call, `schedule` picks the
rows of the next launch, `update_from_output` takes a landed launch's outputs back. It runs
no model, awaits nothing and starts no process, so tests drive it directly
(tests/serving/test_scheduler.py).

The rules:
- A session's calls run one after the other in arrival order; each launch advances the head
  call of up to `max_batch` sessions by ONE row: one operation of a Generate, or up to
  `steps_per_launch` steps of a Step call, whose inputs are all known (multi-step launches,
  after vLLM's multi-step scheduling: the worker runs them back to back in one message).
- Sessions take turns: one that took part in a launch goes to the back of the line.
- A call that has not started yet is checked against `expected_step` (FAILED_PRECONDITION,
  nothing run) and dropped if its caller left.
- Launches are pipelined, so a session may have rows in flight. Meanwhile it adds more rows
  of the same call only while no other session has calls, and only when they do not depend
  on the ones in flight (a Step call's inputs are all known); its next call waits until they
  have landed. With other sessions calling, running ahead would let one group of sessions
  fill every launch in flight and keep later arrivals in small launches of their own, the
  groups never merging (docs/performance.md, "Running ahead").
- A session without a slot asks `Placement` for one (restoring it, maybe parking another);
  once none can be had, no other parked session is tried in this launch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, Protocol

from serving.calls import Call
from serving.errors import FailedPrecondition, ServingError
from serving.protocol import Operation
from serving.sessions import Session


class Placement(Protocol):
    """Where sessions' states are: the scheduler asks it for slots (`serving.slots`)."""

    def in_transit(self, session: Session) -> bool:
        """Whether the session's state is being parked by a launch still in flight."""

    def place(self, session: Session, launch: Collection[str]) -> bool:
        """Give a parked session a slot for the launch being assembled, parking a session
        whose id is not in `launch` if none is free; False if none can be had now. Raises
        if the session's state cannot be restored."""


class Row(NamedTuple):
    """One row of a launch: a call, the operation it needs, that operation's argument and
    how many steps of it the row runs (STEP: `argument` holds one input per step)."""

    call: Call
    operation: Operation
    argument: Any
    steps: int = 1


def _ignore(call: Call) -> None:
    pass


class Scheduler:
    """The queued calls of one model's sessions and the order they run in."""

    def __init__(
        self,
        max_batch: int,
        on_start: Callable[[Call], None] = _ignore,
        on_finish: Callable[[Call], None] = _ignore,
        steps_per_launch: int = 1,
        keep_ops: bool = True,
    ) -> None:
        self.max_batch = max_batch
        self.steps_per_launch = steps_per_launch
        self.keep_ops = keep_ops  # record each call's operations (`Call.ops`) for its journal
        self.on_start = on_start  # a call's first row was scheduled
        self.on_finish = on_finish  # a call was answered (`call.result` or `call.error`)
        self.queues: dict[str, deque[Call]] = {}  # per session id, arrival order
        self.ready: OrderedDict[str, Session] = OrderedDict()  # with calls queued, in turn
        self.in_flight: dict[str, int] = {}  # rows in launches not yet landed, per session
        self.queued_calls = 0

    def add(self, call: Call) -> None:
        session = call.session
        self.queues.setdefault(session.id, deque()).append(call)
        self.queued_calls += 1
        if session.id not in self.ready:
            self.ready[session.id] = session

    def has_calls(self, session: Session) -> bool:
        return bool(self.queues.get(session.id))

    def schedule(self, placement: Placement, start: bool = True) -> list[Row]:
        """The rows of the next launch (none if no session can take part now). Without
        `start`, only calls already started go on; the others keep their turn."""
        rows: list[Row] = []
        in_launch: set[str] = set()
        can_place = True  # False once no slot can be had for the rest of this launch
        for session in list(self.ready.values()):
            if len(rows) >= self.max_batch:
                break
            if self.in_flight.get(session.id):
                call = self._runs_ahead(session) if len(self.ready) == 1 else None  # alone
            else:
                call = self._head(session)
                if call is not None and not (start or call.started):
                    continue  # it keeps its turn for the next launch that starts calls
                if call is not None and session.slot is None:
                    if not can_place or placement.in_transit(session):
                        continue
                    try:
                        if not placement.place(session, in_launch):
                            can_place = False  # every slot is stepping in this launch
                            continue
                    except Exception as error:  # the park directory failed under us
                        self.drop(session, as_serving_error(error, session))
                        continue
            if call is None:
                continue
            if not call.started:
                call.started, call.from_step = True, session.step
                self.on_start(call)
            rows.append(Row(call, *call.next_row(self.steps_per_launch)))
            in_launch.add(session.id)
            self.in_flight[session.id] = self.in_flight.get(session.id, 0) + 1
        return rows

    def _runs_ahead(self, session: Session) -> Call | None:
        """The call with rows in flight, if it may add another before they land."""
        queue = self.queues.get(session.id)
        if not queue or session.slot is None:
            return None
        call = queue[0]
        return None if call.abandoned or not call.runs_ahead() else call

    def _head(self, session: Session) -> Call | None:
        """The session's next call to run, dropping abandoned and out-of-order ones."""
        queue = self.queues.get(session.id)
        while queue:
            call = queue[0]
            if call.abandoned:  # its caller left; nothing of it is in flight now
                self._finish(call, result=session.step)
            elif (
                not call.started
                and call.expected_step is not None
                and call.expected_step != session.step
            ):
                self._finish(
                    call,
                    error=FailedPrecondition(
                        f"expected_step is {call.expected_step} but session {session.id} "
                        f"is at step {session.step}"
                    ),
                )
            else:
                return call
        self.ready.pop(session.id, None)
        return None

    def update_from_output(self, rows: Sequence[Row], outputs: Sequence[Any]) -> None:
        """A launch landed: every row's session took its steps; calls take their outputs,
        and those complete (or abandoned) are answered."""
        for row, output in zip(rows, outputs, strict=True):
            call, session = row.call, row.call.session
            session.step += row.steps  # the state took them, whoever still waits for them
            self._landed(session)
            if call.finished:  # answered while this row was in flight (its session ended)
                continue
            if self.keep_ops:
                call.ops.append((row.operation, row.argument))
            if call.take(output) or call.abandoned:
                self._finish(call, result=session.step)
            if self.queues.get(session.id):
                self.ready.move_to_end(session.id)
            else:
                self.ready.pop(session.id, None)

    def update_from_failure(self, rows: Sequence[Row]) -> list[Session]:
        """A launch failed: nothing is known of its rows' states. Returns their sessions,
        which the caller ends (their calls are answered then)."""
        sessions: dict[str, Session] = {}
        for row in rows:
            self._landed(row.call.session)
            sessions[row.call.session.id] = row.call.session
        return list(sessions.values())

    def _landed(self, session: Session) -> None:
        left = self.in_flight[session.id] - 1
        if left:
            self.in_flight[session.id] = left
        else:
            del self.in_flight[session.id]

    def drop(self, session: Session, error: Exception) -> None:
        """Answer every call queued on the session with `error` (it ended, or cannot run)."""
        for call in list(self.queues.get(session.id, ())):
            self._finish(call, error=error)
        self.ready.pop(session.id, None)

    def drop_all(self, error: Exception) -> None:
        for session in list(self.ready.values()):
            self.drop(session, error)

    def _finish(
        self, call: Call, result: int | None = None, error: Exception | None = None
    ) -> None:
        """Take a call off its session's queue and answer it."""
        session = call.session
        queue = self.queues[session.id]
        queue.remove(call)
        if not queue:
            del self.queues[session.id]
        self.queued_calls -= 1
        session.last_used = time.monotonic()
        call.finish(result if error is None else None, error)
        self.on_finish(call)


def as_serving_error(error: Exception, session: Session) -> ServingError:
    if isinstance(error, ServingError):
        return error
    return ServingError(f"session {session.id} could not be restored: {error}")

"""The scheduler alone: no model, no process, no event loop. Calls are queued, launches are
scheduled and landed by hand, and what the scheduler decides is checked against its rules
(serving/scheduler.py)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import grpc
import numpy as np
import pytest

from serving.calls import Call, StepCall
from serving.errors import NotFound, ServingError
from serving.protocol import Operation
from serving.scheduler import Row, Scheduler
from serving.sessions import Session


class Slots:
    """A placement with `capacity` slots that parks the least recently placed session not in
    the launch (what `serving.slots` does, without states)."""

    def __init__(self, capacity: int) -> None:
        self.free = list(range(capacity))
        self.holders: list[Session] = []  # least recently placed first
        self.transit: set[str] = set()
        self.refuse: set[str] = set()  # sessions whose restore raises
        self.placed: list[str] = []

    def add(self, session: Session) -> None:
        session.slot = self.free.pop(0)
        self.holders.append(session)

    def in_transit(self, session: Session) -> bool:
        return session.id in self.transit

    def place(self, session: Session, launch: Collection[str]) -> bool:
        if session.id in self.refuse:
            raise OSError("the park directory is gone")
        if not self.free:
            victim = next((s for s in self.holders if s.id not in launch), None)
            if victim is None:
                return False
            self.holders.remove(victim)
            assert victim.slot is not None
            self.free.append(victim.slot)
            victim.slot = None
        self.add(session)
        self.placed.append(session.id)
        return True


def session(name: str, step: int = 0, slots: Slots | None = None) -> Session:
    made = Session(id=name, model="m", ttl=60.0, last_used=0.0, step=step)
    if slots is not None:
        slots.add(made)
    return made


def step_call(owner: Session, steps: int, expected_step: int | None = None) -> StepCall:
    inputs = np.arange(steps * 2, dtype=np.float32).reshape(steps, 2) + 100 * len(owner.id)
    return StepCall(
        session=owner,
        enqueued=0.0,
        inputs=inputs,
        outputs=np.full((steps, 2), np.nan, np.float32),
        expected_step=expected_step,
    )


class OneAtATime(Call):
    """A call whose next row depends on the last one's output (as a Generate's does)."""

    def __init__(self, owner: Session, rows: int) -> None:
        super().__init__(session=owner, enqueued=0.0)
        self.rows, self.taken = rows, 0

    def next_row(self, most: int = 1) -> tuple[Operation, Any, int]:
        return Operation.ENCODE, self.taken, 1

    def take(self, output: Any) -> bool:
        self.taken += 1
        return self.taken == self.rows


def land(scheduler: Scheduler, rows: list[Row]) -> None:
    """Land a launch: each STEP row's output is its input doubled."""
    scheduler.update_from_output(
        rows, [row.argument * 2 if row.operation is Operation.STEP else None for row in rows]
    )


def sessions_of(rows: list[Row]) -> list[str]:
    return [row.call.session.id for row in rows]


def test_each_launch_advances_every_ready_session_by_one_row_in_turn() -> None:
    slots = Slots(8)
    a, b, c = (session(n, slots=slots) for n in "abc")
    scheduler = Scheduler(max_batch=8)
    calls = [step_call(a, 3), step_call(b, 1), step_call(c, 2)]
    for call in calls:
        scheduler.add(call)
    first = scheduler.schedule(slots)
    assert sessions_of(first) == ["a", "b", "c"]
    land(scheduler, first)
    assert calls[1].finished and calls[1].result == 1 and b.step == 1
    assert list(scheduler.ready) == ["a", "c"]
    second = scheduler.schedule(slots)
    land(scheduler, second)
    land(scheduler, scheduler.schedule(slots))
    assert [call.result for call in calls] == [3, 1, 2]
    assert scheduler.queued_calls == 0 and not scheduler.ready and not scheduler.in_flight
    np.testing.assert_array_equal(calls[0].outputs, calls[0].inputs * 2)


def test_max_batch_bounds_a_launch_and_the_rest_go_first_next_time() -> None:
    slots = Slots(8)
    sessions = [session(str(i), slots=slots) for i in range(5)]
    scheduler = Scheduler(max_batch=2)
    for owner in sessions:
        scheduler.add(step_call(owner, 2))
    first = scheduler.schedule(slots)
    assert sessions_of(first) == ["0", "1"]
    land(scheduler, first)
    assert sessions_of(scheduler.schedule(slots)) == ["2", "3"]


def test_a_sessions_calls_run_in_order_and_only_its_started_step_call_runs_ahead() -> None:
    slots = Slots(4)
    a = session("a", slots=slots)
    scheduler = Scheduler(max_batch=4)
    first, second = step_call(a, 2), step_call(a, 1)
    scheduler.add(first)
    scheduler.add(second)
    launches = [scheduler.schedule(slots) for _ in range(3)]  # three launches in flight
    assert [len(rows) for rows in launches] == [1, 1, 0]  # the second call waits
    assert all(row.call is first for rows in launches for row in rows)
    for rows in launches:
        land(scheduler, rows)
    assert first.result == 2 and not second.started
    land(scheduler, scheduler.schedule(slots))
    assert second.result == 3


def test_a_launch_that_starts_no_call_goes_on_with_started_ones_and_places_no_one() -> None:
    """What the pipeline asks while a commit is in flight (`start=False`): the calls already
    started take their next row; calls not started keep their turn and their sessions stay
    where they are (a parked one is not placed); the next launch that may start calls
    starts them in the order they came."""
    slots = Slots(2)
    a, b = session("a", slots=slots), session("b", slots=slots)
    c = session("c")  # parked: no slot
    scheduler = Scheduler(max_batch=4)
    long = step_call(a, 2)
    scheduler.add(long)
    land(scheduler, scheduler.schedule(slots))  # a's call started, one row landed
    scheduler.add(step_call(b, 1))
    scheduler.add(step_call(c, 1))
    held = scheduler.schedule(slots, start=False)
    assert [(row.call, row.steps) for row in held] == [(long, 1)]
    assert slots.placed == [] and c.slot is None
    assert list(scheduler.ready) == ["a", "b", "c"]
    land(scheduler, held)
    assert long.result == 2
    assert sessions_of(scheduler.schedule(slots, start=False)) == []
    assert sessions_of(scheduler.schedule(slots)) == ["b", "c"]
    assert slots.placed == ["c"]


def test_a_launch_runs_up_to_steps_per_launch_steps_of_a_step_call() -> None:
    """A Step call of 10 with steps_per_launch 4, alone on the server, goes out as rows of
    4, 4 and 2 steps, each sent before the last lands; the session's count, the outputs and
    the operations it records come out as with one step per launch."""
    slots = Slots(4)
    a = session("a", slots=slots)
    scheduler = Scheduler(max_batch=4, steps_per_launch=4)
    long = step_call(a, 10)
    scheduler.add(long)
    launches = [scheduler.schedule(slots) for _ in range(3)]
    assert [[row.steps for row in rows] for rows in launches] == [[4], [4], [2]]
    assert scheduler.schedule(slots) == []  # a has nothing left to send
    for rows in launches:
        land(scheduler, rows)
    assert long.result == 10 and a.step == 10
    np.testing.assert_array_equal(long.outputs, long.inputs * 2)
    # its journal keeps each launch's row whole: 4, 4 and 2 steps' inputs
    assert [(operation, len(inputs)) for operation, inputs in long.ops] == [
        (Operation.STEP, 4),
        (Operation.STEP, 4),
        (Operation.STEP, 2),
    ]
    np.testing.assert_array_equal(np.concatenate([inputs for _, inputs in long.ops]), long.inputs)


def test_with_other_sessions_calling_a_step_call_waits_for_its_row_to_land() -> None:
    """Running ahead would let one group of sessions fill every launch in flight and keep
    later arrivals in launches of their own (measured: docs/performance.md); so with other
    sessions calling, a session's next row goes in the launch after its last row lands,
    together with the others'. Other calls take one row each."""
    slots = Slots(4)
    a, b = session("a", slots=slots), session("b", slots=slots)
    scheduler = Scheduler(max_batch=4, steps_per_launch=4)
    long, generate = step_call(a, 10), OneAtATime(b, 2)
    scheduler.add(long)
    scheduler.add(generate)
    first = scheduler.schedule(slots)
    assert [row.steps for row in first] == [4, 1]
    assert scheduler.schedule(slots) == []  # a and b each wait for their row
    land(scheduler, first)
    second = scheduler.schedule(slots)
    assert sorted((row.call.session.id, row.steps) for row in second) == [("a", 4), ("b", 1)]
    land(scheduler, second)
    assert generate.result == 2 and b.step == 2
    third = scheduler.schedule(slots)  # a alone now: its last row goes out
    assert [row.steps for row in third] == [2]
    land(scheduler, third)
    assert long.result == 10 and a.step == 10
    np.testing.assert_array_equal(long.outputs, long.inputs * 2)


def test_a_call_that_needs_its_last_output_waits_for_it() -> None:
    slots = Slots(4)
    a = session("a", slots=slots)
    scheduler = Scheduler(max_batch=4)
    call = OneAtATime(a, 3)
    scheduler.add(call)
    assert len(scheduler.schedule(slots)) == 1
    assert scheduler.schedule(slots) == []  # nothing more until the row lands


def test_expected_step_refuses_a_call_out_of_order_and_runs_nothing() -> None:
    slots = Slots(4)
    a = session("a", step=5, slots=slots)
    scheduler = Scheduler(max_batch=4)
    wrong, right = step_call(a, 1, expected_step=4), step_call(a, 1, expected_step=5)
    scheduler.add(wrong)
    scheduler.add(right)
    rows = scheduler.schedule(slots)
    assert [row.call for row in rows] == [right]
    assert wrong.finished and isinstance(wrong.error, ServingError)
    assert wrong.error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert a.step == 5 and "at step 5" in str(wrong.error)


def test_an_abandoned_call_stops_at_the_next_launch() -> None:
    slots = Slots(4)
    a, b = session("a", slots=slots), session("b", slots=slots)
    scheduler = Scheduler(max_batch=4)
    waiting, running = step_call(a, 2), step_call(b, 5)
    scheduler.add(waiting)
    scheduler.add(running)
    waiting.left = True  # before it started: never runs
    rows = scheduler.schedule(slots)
    assert sessions_of(rows) == ["b"] and waiting.finished and a.step == 0
    running.left = True  # with a row in flight: that row's step counts, no more rows
    assert scheduler.schedule(slots) == []
    land(scheduler, rows)
    assert running.finished and b.step == 1 and scheduler.queued_calls == 0


def test_a_parked_session_is_placed_and_once_none_can_be_no_other_is_tried() -> None:
    slots = Slots(2)
    holders = [session("x", slots=slots), session("y", slots=slots)]
    parked = [session(name) for name in ("p", "q")]
    scheduler = Scheduler(max_batch=8)
    for owner in [*holders, *parked]:
        scheduler.add(step_call(owner, 1))
    rows = scheduler.schedule(slots)
    # x and y are in the launch: nothing can be parked for p, and q is not even tried
    assert sessions_of(rows) == ["x", "y"] and slots.placed == []
    land(scheduler, rows)
    rows = scheduler.schedule(slots)
    assert sessions_of(rows) == ["p", "q"] and slots.placed == ["p", "q"]


def test_sessions_in_transit_wait_and_a_failed_restore_answers_their_calls() -> None:
    slots = Slots(1)
    moving, broken = session("moving"), session("broken")
    slots.transit.add("moving")
    slots.refuse.add("broken")
    scheduler = Scheduler(max_batch=4)
    first, second = step_call(moving, 1), step_call(broken, 1)
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.schedule(slots) == []
    assert not first.finished and second.finished and second.error is not None
    assert "could not be restored" in str(second.error)
    slots.transit.clear()
    assert sessions_of(scheduler.schedule(slots)) == ["moving"]


def test_dropping_a_session_answers_its_calls_and_late_rows_change_no_answer() -> None:
    slots = Slots(2)
    a = session("a", slots=slots)
    scheduler = Scheduler(max_batch=2)
    running, queued = step_call(a, 3), step_call(a, 1)
    scheduler.add(running)
    scheduler.add(queued)
    rows = scheduler.schedule(slots)
    scheduler.drop(a, NotFound("session a was deleted"))
    assert running.finished and queued.finished
    assert isinstance(running.error, NotFound) and running.result is None
    land(scheduler, rows)  # the row in flight lands after the session ended
    assert isinstance(running.error, NotFound) and not scheduler.in_flight


def test_a_failed_launch_names_its_sessions_once() -> None:
    slots = Slots(4)
    a, b = session("a", slots=slots), session("b", slots=slots)
    scheduler = Scheduler(max_batch=4)
    scheduler.add(step_call(a, 3))
    first, second = scheduler.schedule(slots), scheduler.schedule(slots)  # a alone: ahead
    scheduler.add(step_call(b, 1))
    third = scheduler.schedule(slots)
    assert sessions_of(second) == ["a"] and sessions_of(third) == ["b"]
    lost = scheduler.update_from_failure(first)
    assert [s.id for s in lost] == ["a"] and a.step == 0
    assert scheduler.in_flight == {"a": 1, "b": 1}  # the later launches' rows are still out


def test_hooks_see_every_call_start_once_and_finish_once() -> None:
    slots = Slots(4)
    a, b = session("a", slots=slots), session("b", slots=slots)
    started: list[Call] = []
    finished: list[Call] = []
    scheduler = Scheduler(max_batch=4, on_start=started.append, on_finish=finished.append)
    calls = [step_call(a, 2), step_call(b, 1), step_call(a, 1, expected_step=9)]
    for call in calls:
        scheduler.add(call)
    while scheduler.ready:
        land(scheduler, scheduler.schedule(slots))
    assert started == calls[:2] and sorted(map(id, finished)) == sorted(map(id, calls))


@pytest.mark.parametrize("steps_per_launch", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_keeps_every_rule(seed: int, steps_per_launch: int) -> None:
    """Random calls on 12 sessions over 5 slots, up to three launches in flight, callers
    leaving at random: every launch holds distinct sessions within max_batch and rows within
    steps_per_launch, every step of a session lands in order, and every step is counted
    exactly once."""
    rng = np.random.default_rng(seed)
    slots = Slots(5)
    owners = [session(f"s{i}", slots=slots if i < 5 else None) for i in range(12)]
    scheduler = Scheduler(max_batch=4, steps_per_launch=steps_per_launch)
    calls: list[StepCall] = []
    flights: list[list[Row]] = []
    expected_steps = dict.fromkeys((s.id for s in owners), 0)
    landed_rows: dict[str, list[float]] = {s.id: [] for s in owners}

    def land_and_count(rows: list[Row]) -> None:
        for row in rows:
            assert 1 <= row.steps == len(row.argument) <= steps_per_launch
            expected_steps[row.call.session.id] += row.steps
            landed_rows[row.call.session.id].extend(row.argument[:, 0].tolist())
        land(scheduler, rows)

    for _ in range(3000):
        if rng.random() < 0.3:
            call = step_call(owners[int(rng.integers(12))], int(rng.integers(1, 5)))
            call.inputs[:, 0] = np.arange(len(calls) * 10, len(calls) * 10 + len(call.inputs))
            calls.append(call)
            scheduler.add(call)
        if rng.random() < 0.05 and calls:
            calls[int(rng.integers(len(calls)))].left = True
        if len(flights) < 3:
            rows = scheduler.schedule(slots)
            ids = sessions_of(rows)
            assert len(ids) == len(set(ids)) <= 4
            assert all(row.call.session.slot is not None for row in rows)
            if rows:
                flights.append(rows)
        if flights and (len(flights) == 3 or rng.random() < 0.5):
            land_and_count(flights.pop(0))
    while flights or scheduler.ready:
        if flights:
            land_and_count(flights.pop(0))
        rows = scheduler.schedule(slots)
        if rows:
            flights.append(rows)
    for owner in owners:
        assert owner.step == expected_steps[owner.id]
        assert landed_rows[owner.id] == sorted(landed_rows[owner.id])  # arrival order
    for call in calls:
        assert call.finished
        if not call.abandoned:
            assert call.result is not None and call.done == len(call.inputs)
            np.testing.assert_array_equal(call.outputs, call.inputs * 2)
            np.testing.assert_array_equal(np.concatenate([x for _, x in call.ops]), call.inputs)
    assert scheduler.queued_calls == 0 and not scheduler.in_flight

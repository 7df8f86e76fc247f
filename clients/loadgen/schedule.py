"""When requests go out: the closed loop (C workers back to back) and the open loop (a fixed
rate, latency from each request's intended start), over any `Target`: the real one speaks
gRPC (`workloads.py`), the tests use a fake with a slow call.

A level runs `warmup` seconds unmeasured, then its measuring window: `duration` seconds, or
until `requests` measured requests. A request is measured when its intended start lies in
the window (in the closed loop the intended start is the actual one). After the window no
new request starts; those in flight finish, and every session still open is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from clients.loadgen.recording import OK, Outcome, Recorder

ERROR_PAUSE = 0.01  # closed loop: a worker whose call failed waits this long (no hot loop)
START_DELAY = 0.005  # open loop: t0 is this far ahead, so request 0 is not late at once
EPSILON = 1e-9  # rounding slack when turning times into request indices
POLL_SECONDS = 0.05  # longer waits also watch for Ctrl-C
INTERRUPT_GRACE = 1.0  # after Ctrl-C, requests in flight have this long to finish


def now() -> float:
    return time.perf_counter()


class SessionRefused(Exception):  # noqa: N818 - a refusal, not a bug: it carries the code
    """CreateSession failed with `code`."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class Session:
    """A session on the server and how far the workload has got with it."""

    session_id: str
    sequence: int  # the n-th session of the run: picks its inputs, prompts and seed
    stub: Any = None  # the channel's stub it talks over
    used: int = 0  # requests made so far
    gone: bool = False  # the server said NOT_FOUND: nothing to delete
    stream: Any = None  # a call the workload keeps open on it (StepStream), if any
    request_id: str = ""  # names the request under way on it; its retries send it again
    reply: Any = None  # what a Generate request under way has received, over its attempts


class Target(Protocol):
    """What the schedules drive: open and close sessions, make one request."""

    async def open_session(self) -> Session:
        """A new session; raises SessionRefused."""
        ...

    async def close_session(self, session: Session) -> None:
        """Delete it (never raises for the server's refusal: that is counted)."""
        ...

    async def request(self, session: Session, intended: float) -> Outcome:
        """One request on the session (the caller makes one at a time per session)."""
        ...


@dataclass(frozen=True)
class Plan:
    """How long a level runs and how its sessions are used."""

    warmup: float
    duration: float | None  # measuring window in seconds, or
    requests: int | None  # measured requests
    requests_per_session: int  # K
    max_outstanding: int = 256  # open loop only
    drain_timeout: float = 10.0  # open loop only


class Level:
    """One level while it runs: its recorder, its phase, and events for the watchers
    (`opened` at the window's start, `closed` at its end; both set by the end)."""

    def __init__(self, label: str, recorder: Recorder, interrupted: asyncio.Event) -> None:
        self.label = label
        self.recorder = recorder
        self.interrupted = interrupted
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.phase = "starting"
        self.started = now()
        self.live: dict[str, Session] = {}  # sessions open on the server
        self.session_calls: set[asyncio.Future[Any]] = set()  # CreateSession, DeleteSession

    def open_window(self) -> None:
        if not self.opened.is_set():
            self.phase = "measuring"
            self.opened.set()

    def close_window(self, cut: bool = True) -> None:
        """The window ends now, or at its planned end if that came first (or if not `cut`:
        the level is over and only a window without a planned end takes this moment)."""
        if not self.closed.is_set():
            moment = now()
            if self.recorder.end is None or (cut and moment < self.recorder.end):
                self.recorder.end = moment
            if not self.opened.is_set():  # interrupted in the warm-up: an empty window
                self.recorder.start = self.recorder.end
            self.phase = "draining"
            self.closed.set()

    def interrupt(self) -> None:
        self.recorder.interrupted = True
        self.close_window()

    async def pause(self, seconds: float) -> None:
        """Sleep, waking early (within POLL_SECONDS) on Ctrl-C."""
        deadline = now() + seconds
        while not self.interrupted.is_set():
            left = deadline - now()
            if left <= 0:
                return
            await asyncio.sleep(min(left, POLL_SECONDS))

    async def open(self, target: Target) -> Session:
        """A new session, kept in `live`. Shielded: a caller cancelled meanwhile does not
        cancel the CreateSession, whose session `teardown` then deletes."""

        async def create() -> Session:
            session = await target.open_session()
            self.live[session.session_id] = session
            return session

        return await asyncio.shield(self._keep(asyncio.ensure_future(create())))

    async def close(self, target: Target, session: Session) -> None:
        """Delete a session (once). Shielded: a DeleteSession is never cut short."""
        if self.live.pop(session.session_id, None) is not None:
            await asyncio.shield(self._keep(asyncio.ensure_future(target.close_session(session))))

    def _keep(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Track a session call until it is done, so `teardown` can wait for it."""
        self.session_calls.add(future)
        future.add_done_callback(self.session_calls.discard)
        return future

    async def teardown(self, target: Target) -> None:
        """Wait for the session calls under way, then delete every session still open."""
        self.phase = "cleaning up"
        while self.session_calls:
            await asyncio.gather(*list(self.session_calls), return_exceptions=True)
        leftover = list(self.live.values())
        self.live.clear()
        await asyncio.gather(*(target.close_session(session) for session in leftover))


async def run_until_interrupted(level: Level, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for `tasks`. On Ctrl-C the window closes; tasks still running get
    INTERRUPT_GRACE seconds to finish, then are cancelled (their calls count as CANCELLED)."""
    pending = set(tasks)
    while pending and not level.interrupted.is_set():
        _, pending = await asyncio.wait(pending, timeout=POLL_SECONDS)
    if level.interrupted.is_set():
        level.interrupt()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=INTERRUPT_GRACE)
        for task in pending:
            task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:  # a bug in a worker must not pass silently
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def _window_timer(level: Level, start: float, end: float | None) -> None:
    """Open the window at `start` and close it at `end` (unless Ctrl-C comes first)."""
    await level.pause(start - now())
    if level.interrupted.is_set():
        return
    level.open_window()
    if end is not None:
        await level.pause(end - now())
        if not level.interrupted.is_set():
            level.close_window()


# ---------------------------------------------------------------------------- closed loop


async def closed_loop(target: Target, plan: Plan, level: Level, concurrency: int) -> None:
    """C workers, each: open a session, K requests back to back, close it, again; until the
    window ends (or its `requests` have started), then the sessions are deleted."""
    recorder = level.recorder
    recorder.start = now() + plan.warmup
    recorder.end = None if plan.duration is None else recorder.start + plan.duration
    level.phase = "warm-up"
    budget = plan.requests  # measured requests left to start (count-bounded levels)
    issuing = True

    def may_start(moment: float) -> bool:
        if not issuing or level.interrupted.is_set() or level.closed.is_set():
            return False
        return recorder.end is None or moment < recorder.end

    def measured(moment: float) -> bool:
        """Whether a request starting now is measured (and count it against the budget)."""
        nonlocal budget, issuing
        if moment < recorder.start or (budget is not None and budget <= 0):
            return False
        level.open_window()
        if budget is not None:
            budget -= 1
            issuing = budget > 0
        return True

    def record(outcome: Outcome, start: float) -> None:
        recorder.record(outcome, start)
        if not issuing and recorder.completed == recorder.issued:
            level.close_window()  # the last of `requests` measured requests is back

    async def request(session: Session) -> Outcome:
        start = now()
        counted = measured(start)
        if counted:
            recorder.sent()
        try:
            outcome = await target.request(session, start)
        except asyncio.CancelledError:
            if counted:
                recorder.cancelled += 1
            raise
        recorder.finished(outcome, start)
        if counted:
            record(outcome, start)
        return outcome

    async def worker() -> None:
        while may_start(now()):
            start = now()
            try:
                session = await level.open(target)
            except SessionRefused as refused:
                # As in the open loop: a request that cannot get a session fails with
                # CreateSession's status code.
                if measured(start):
                    recorder.sent()
                    record(Outcome(refused.code, now(), refused.detail), start)
                await level.pause(ERROR_PAUSE)
                continue
            while session.used < plan.requests_per_session and may_start(now()):
                outcome = await request(session)
                session.used += 1
                if outcome.code != OK:  # the session may be unusable: start a fresh one
                    await level.close(target, session)
                    await level.pause(ERROR_PAUSE)
                    break
            await level.close(target, session)

    timer = asyncio.create_task(_window_timer(level, recorder.start, recorder.end))
    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await run_until_interrupted(level, workers)
    finally:
        timer.cancel()
        level.close_window(cut=False)
        await level.teardown(target)


# ---------------------------------------------------------------------------- open loop


def index_at(offset: float, rate: float) -> int:
    """How many of the times i / rate (i = 0, 1, ...) lie before `offset` seconds."""
    return max(0, math.ceil(offset * rate - EPSILON))


class SessionPool:
    """The open loop's sessions: a request takes an idle one (or opens one, inside its
    latency), gives it back, and the K-th request retires it: it is deleted and, while
    requests are still being issued, a fresh one takes its place in the background."""

    def __init__(self, target: Target, level: Level, requests_per_session: int) -> None:
        self.target = target
        self.level = level
        self.requests_per_session = requests_per_session
        self.idle: deque[Session] = deque()
        self.background: set[asyncio.Task[None]] = set()
        self.replenish = True

    async def acquire(self) -> Session:
        if self.idle:
            return self.idle.popleft()
        return await self.level.open(self.target)

    def release(self, session: Session, outcome: Outcome) -> None:
        session.used += 1
        if session.used < self.requests_per_session and outcome.code == OK:
            self.idle.append(session)
            return
        task = asyncio.create_task(self._renew(session))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _renew(self, session: Session) -> None:
        await self.level.close(self.target, session)
        if self.replenish and not self.level.interrupted.is_set():
            with contextlib.suppress(SessionRefused):
                self.idle.append(await self.level.open(self.target))

    async def settle(self) -> None:
        """Wait for the deletions and replacements under way (never cancelled: a cancelled
        DeleteSession would leave its session behind)."""
        self.replenish = False
        while self.background:
            await asyncio.gather(*list(self.background))


async def acquire_before(semaphore: asyncio.Semaphore, deadline: float, level: Level) -> bool:
    """Take a place from `semaphore`, giving up at `deadline` or on Ctrl-C."""
    acquiring = asyncio.ensure_future(semaphore.acquire())
    while not acquiring.done() and not level.interrupted.is_set():
        left = deadline - now()
        if left <= 0:
            break
        await asyncio.wait({acquiring}, timeout=min(left, POLL_SECONDS))
    if not acquiring.done():
        acquiring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquiring
    return acquiring.done() and not acquiring.cancelled()


async def open_loop(target: Target, plan: Plan, level: Level, rate: float) -> None:
    """Request i starts at t0 + i / rate whatever the answers do, on a session from the pool.

    Its latency counts from that intended time, so a server (or a client) that falls behind
    shows it in the percentiles instead of slowing the requests down (coordinated
    omission). With `max_outstanding` requests in flight the next one waits for a place
    (it is counted late and capped); whatever still waits `drain_timeout` seconds after the
    window is counted unsent."""
    recorder = level.recorder
    t0 = now() + START_DELAY
    first = index_at(plan.warmup, rate)
    if plan.duration is not None:
        end_index = index_at(plan.warmup + plan.duration, rate)
        recorder.end = t0 + plan.warmup + plan.duration
    else:
        assert plan.requests is not None
        end_index = first + plan.requests
        recorder.end = t0 + end_index / rate
    recorder.start = t0 + plan.warmup
    drain_deadline = recorder.end + plan.drain_timeout
    level.phase = "warm-up"
    pool = SessionPool(target, level, plan.requests_per_session)
    places = asyncio.Semaphore(plan.max_outstanding)
    in_flight: set[asyncio.Task[None]] = set()

    def measured_from(index: int) -> int:
        """Measured requests from `index` on that were due before the window closed."""
        assert recorder.end is not None
        due = min(end_index, index_at(recorder.end - t0, rate))
        return max(0, due - max(index, first))

    async def request(intended: float, counted: bool) -> None:
        try:
            session = await pool.acquire()
            outcome = await target.request(session, intended)
        except SessionRefused as refused:
            if counted:
                recorder.record(Outcome(refused.code, now(), refused.detail), intended)
            return
        except asyncio.CancelledError:
            if counted:
                recorder.cancelled += 1
            raise
        finally:
            places.release()
        recorder.finished(outcome, intended)
        if counted:
            recorder.record(outcome, intended)
        pool.release(session, outcome)

    async def issue() -> None:
        for index in range(end_index):
            intended = t0 + index / rate
            await level.pause(intended - now())
            if level.interrupted.is_set():
                level.interrupt()
                recorder.unsent += measured_from(index)
                return
            capped = places.locked()
            if not capped:
                await places.acquire()  # a free place: taken at once, without yielding
            elif not await acquire_before(places, drain_deadline, level):
                if level.interrupted.is_set():
                    level.interrupt()
                recorder.unsent += measured_from(index)
                return
            counted = index >= first
            if counted:
                recorder.sent(now() - intended, capped)
            task = asyncio.create_task(request(intended, counted))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    timer = asyncio.create_task(_window_timer(level, recorder.start, recorder.end))
    try:
        await run_until_interrupted(level, [asyncio.create_task(issue())])
        pool.replenish = False  # no request will need a fresh session now
        level.phase = "draining"
        await run_until_interrupted(level, list(in_flight))
        await pool.settle()
    finally:
        timer.cancel()
        level.close_window(cut=False)
        await level.teardown(target)

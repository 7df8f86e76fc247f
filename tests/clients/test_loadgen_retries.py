"""`memserve loadgen --attempts` against a real memserve on a durable store (servers.Durable:
`dir:`, and `redis://` on a real redis-server): the server killed with SIGKILL while a Step
runs and while a reply streams, and started again on the same store behind the relay; held
(SIGSTOP) past an attempt's time limit; its Redis killed and started again. Each time every
request is recorded once, OK, its steps applied once (the step count each Step answer
reports), a resumed reply's pieces counted once (as many as an uninterrupted run's), and
the load generator's count of calls is the server's: exactly, where one server saw the
whole run; across a restart, but for the attempts no server answered (those the kill cut,
and those made while no server was there).

The load generator runs in a thread of the test (`memserve loadgen` through `main`), so that
the test can watch it from inside (`Inside`): which request each session is making, what
each Step answer says, which attempts it retries. Nothing here sleeps to wait: the tests
wait for what the load generator does and what the server reports. The stand-in server's
tests of the same (ids, one record per request) are in test_loadgen.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.redis_server import RedisServer
from clients.loadgen import workload, workloads
from clients.loadgen.schedule import Session
from clients.retry import Deadline
from memserve.cli import main
from tests.clients.servers import (
    LONG,
    TINY,
    WAIT_SECONDS,
    Counts,
    Durable,
    counts_between,
    server_counts,
    settled_counts,
)

PATIENT = ("--attempts", "1000000", "--timeout", "600")  # ride out any restart
REPLY_TOKENS = 200  # of each turn of the chat workload: long enough to be cut mid-way
ONLY_THE_TEST_S = ("GetSession",)  # the load generator never calls it; the tests do


class AtLeastOne:
    """Equal to any count of one or more (the attempts no server answered: the one the
    kill cut, and as many as were made while no server was there)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and other >= 1

    def __repr__(self) -> str:
        return "1 or more"


SOME = AtLeastOne()


@pytest.fixture(scope="module")
def on_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Durable]:
    server = Durable(tmp_path_factory, f"dir:{tmp_path_factory.mktemp('store')}", None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def on_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Durable]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis_server:
        server = Durable(tmp_path_factory, redis_server.url, redis_server)
        yield server
        server.stop()


class Inside:
    """The load generator seen from inside, for one test: every attempt of a request (its
    session, and how many requests the session had made before it), the step count each
    Step answer reports, and each failed attempt it goes on from ("Step UNAVAILABLE").
    `before_attempt(session)` runs (in the load generator's event loop) as each attempt
    starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.attempts: list[tuple[Session, int]] = []
        self.steps: list[int] = []
        self.retried: list[str] = []
        self.before_attempt: Callable[[Session], None] = lambda session: None
        step_call, chat_call = workloads.StepWorkload.call, workloads.ChatWorkload.call
        step_outcome, retry_after = workload.step_outcome, workloads.GrpcTarget._retry_after

        def attempt(session: Session) -> None:
            with self.lock:
                self.attempts.append((session, session.used))
            self.before_attempt(session)

        async def step(workload: Any, session: Session, *args: Any) -> Any:
            attempt(session)
            return await step_call(workload, session, *args)

        async def turn(workload: Any, session: Session, *args: Any) -> Any:
            attempt(session)
            return await chat_call(workload, session, *args)

        def answered(response: Any, *args: Any) -> Any:
            with self.lock:
                self.steps.append(int(response.step))
            return step_outcome(response, *args)

        def retrying(
            target: Any, error: grpc.aio.AioRpcError, number: int, deadline: Deadline, method: str
        ) -> float | None:
            delay = retry_after(target, error, number, deadline, method)
            if delay is not None:
                with self.lock:
                    self.retried.append(f"{method} {error.code().name}")
            return delay

        monkeypatch.setattr(workloads.StepWorkload, "call", step)
        monkeypatch.setattr(workloads.ChatWorkload, "call", turn)
        monkeypatch.setattr(workloads, "step_outcome", answered)
        monkeypatch.setattr(workloads.GrpcTarget, "_retry_after", retrying)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            with self.lock:
                if condition():
                    return
            assert time.monotonic() < deadline, f"waited in vain for {what}"
            time.sleep(0.01)

    def request(self, used: int) -> Session:
        """The session of the first request made after `used` others on its session, once
        it has begun."""
        found: list[Session] = []

        def begun() -> bool:
            found.extend(session for session, before in self.attempts if before == used)
            return bool(found)

        self.wait_for(begun, f"request {used + 1} of a session")
        return found[0]

    def retries(self, what: str) -> int:
        with self.lock:
            return self.retried.count(what)


def loadgen(durable: Durable, out: Path, workload: str, *args: str) -> Callable[[], Any]:
    """`memserve loadgen WORKLOAD` through the relay, one session at a time, in a thread;
    returns what waits for it to end (it must end well) and gives its JSON."""
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    argv = ["loadgen", workload, "--target", durable.relay.target, "--no-progress",
            "--concurrency", "1", "--warmup", "0", "--json", str(out), *args]  # fmt: skip

    def run() -> None:
        try:
            done.set_result(main(argv))
        except BaseException as error:  # SystemExit too: handed to the test
            done.set_exception(error)

    threading.Thread(target=run, name="loadgen", daemon=True).start()

    def record() -> Any:
        assert done.result(timeout=600) == 0
        return json.loads(out.read_text())

    return record


def unanswered(sent: Counts, *counted: Counts) -> Counts:
    """The calls the load generator counted and no server did. A server's count above the
    load generator's fails: it counted calls nobody sent."""
    total: Counts = {}
    for counts in counted:
        for method, codes in counts.items():
            for code, count in codes.items():
                total.setdefault(method, {})[code] = total.get(method, {}).get(code, 0) + count
    missing: Counts = {}
    for method in {*sent, *total}:
        for code in {*sent.get(method, {}), *total.get(method, {})}:
            difference = sent.get(method, {}).get(code, 0) - total.get(method, {}).get(code, 0)
            assert difference >= 0, f"the servers counted {-difference} {method} {code} more"
            if difference:
                missing.setdefault(method, {})[code] = difference
    return missing


def one_record_per_request(record: dict[str, Any], requests: int) -> dict[str, Any]:
    (level,) = record["levels"]
    assert level["requests"]["issued"] == level["requests"]["ok"] == requests
    assert level["requests"]["errors"] == {} and level["latency_ms"]["count"] == requests
    return dict(level)


# ---------------------------------------------------------------------------- kill -9


def test_a_step_cut_by_a_kill_is_sent_again_and_recorded_once(
    on_dir: Durable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGKILL part way through the second (and last) Step, of LONG steps, of a session
    (until the new server is up, connections are refused: attempts fail at once): none of
    it was committed, the server started again has the session as before it, and the retry
    runs it, once. Every Step answer reports the count of steps run once; the request is
    one OK record; every call either server counted, the load generator counted alike."""
    inside = Inside(monkeypatch)
    before = server_counts(on_dir.server)
    finish = loadgen(on_dir, tmp_path / "step.json", "step", "--no-metrics", "--requests", "2",
                     "--steps", "2", "--steps-per-call", str(LONG), *PATIENT)  # fmt: skip
    session = inside.request(used=1)
    on_dir.wait_for_steps(session.session_id, LONG, 2 * LONG)
    old = counts_between(before, server_counts(on_dir.server), ONLY_THE_TEST_S)
    on_dir.restart(session.session_id, committed=LONG, refuse=True)
    record = finish()

    level = one_record_per_request(record, 2)
    assert level["session_steps"] == 2 * LONG
    assert inside.steps == [LONG, 2 * LONG]
    assert inside.retries("Step UNAVAILABLE") >= 1
    sent = record["requests_sent"]
    cut = {"Step": {"UNAVAILABLE": SOME}}
    new = settled_counts(on_dir.server, {}, lambda new: unanswered(sent, old, new) == cut,
                         ONLY_THE_TEST_S)  # fmt: skip
    assert unanswered(sent, old, new) == cut
    assert sent["Step"]["OK"] == 2 and sent["CreateSession"] == sent["DeleteSession"]


def test_a_reply_cut_by_a_kill_is_recorded_once_with_its_pieces_once(
    on_dir: Durable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGKILL while the first reply of a session streams: the turn was not committed, the
    retry runs it again and the server sends it from its start; the load generator skips
    what it heard. The turn is one OK record with its tokens and its pieces once: as many
    pieces, gaps and tokens as the same run (same seed) uninterrupted."""
    inside = Inside(monkeypatch)
    chat = ("--model", TINY, "--requests", "2", "--turns", "2", "--max-tokens",
            str(REPLY_TOKENS), "--seed", "7", "--no-metrics", *PATIENT)  # fmt: skip
    before = server_counts(on_dir.server)
    finish = loadgen(on_dir, tmp_path / "cut.json", "chat", *chat)
    session = inside.request(used=0)
    inside.wait_for(lambda: session.reply is not None and bool(session.reply.pieces), "a piece")
    heard = session.reply
    text_before_the_kill = heard.text
    old = counts_between(before, server_counts(on_dir.server), ONLY_THE_TEST_S)
    on_dir.restart(session.session_id, committed=0)
    record = finish()
    assert len(text_before_the_kill) < len(heard.text)  # cut short, then heard to its end
    assert heard.text.startswith(text_before_the_kill)

    level = one_record_per_request(record, 2)
    assert level["tokens"]["completion"] == 2 * REPLY_TOKENS
    assert inside.retries("Generate UNAVAILABLE") >= 1
    sent = record["requests_sent"]
    cut = {"Generate": {"UNAVAILABLE": SOME}}
    new = settled_counts(on_dir.server, {}, lambda new: unanswered(sent, old, new) == cut,
                         ONLY_THE_TEST_S)  # fmt: skip
    assert unanswered(sent, old, new) == cut
    assert sent["Generate"]["OK"] == 2

    whole = loadgen(on_dir, tmp_path / "whole.json", "chat", *chat)()
    uninterrupted = one_record_per_request(whole, 2)
    assert whole["requests_sent"]["Generate"] == {"OK": 2}
    assert level["tokens"] == uninterrupted["tokens"]
    assert level["ttft_ms"]["count"] == uninterrupted["ttft_ms"]["count"] == 2
    assert level["itl_ms"]["count"] == uninterrupted["itl_ms"]["count"]


# ---------------------------------------------------------------------------- held


def test_a_step_past_its_attempt_s_limit_is_answered_by_its_first_run(
    on_dir: Durable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--attempt-timeout 1 and the server stopped (SIGSTOP) during a Step of LONG steps:
    attempts end DEADLINE_EXCEEDED and are sent again with the request's id; the server,
    let go, runs the first to its end and answers a retry from its log. Had a retry carried
    another id, it would have stepped the session again: every answer reports the steps run
    once. The server counted what the load generator did, but for the attempts given up on:
    the load generator's DEADLINE_EXCEEDED, which the server saw (if at all) as CANCELLED."""
    inside = Inside(monkeypatch)
    before = server_counts(on_dir.server)
    finish = loadgen(on_dir, tmp_path / "held.json", "step", "--no-metrics", "--requests", "2",
                     "--steps", "2", "--steps-per-call", str(LONG), "--attempt-timeout", "1",
                     *PATIENT)  # fmt: skip
    session = inside.request(used=1)
    on_dir.wait_for_steps(session.session_id, LONG, 2 * LONG)
    with on_dir.server.held():
        given_up = inside.retries("Step DEADLINE_EXCEEDED")
        inside.wait_for(lambda: inside.retried.count("Step DEADLINE_EXCEEDED") > given_up,
                        "an attempt given up while the server is held")  # fmt: skip
    record = finish()

    one_record_per_request(record, 2)
    assert inside.steps == [LONG, 2 * LONG]
    sent = record["requests_sent"]

    def settled(counted: Counts) -> bool:  # every call but the attempts given up on
        others = {m: c for m, c in counted.items() if m != "Step"}
        return others == {m: c for m, c in sent.items() if m != "Step"} and (
            counted.get("Step", {}).get("OK") == 2
        )

    counted = settled_counts(on_dir.server, before, settled, ONLY_THE_TEST_S)
    steps_sent, steps_counted = sent.pop("Step"), counted.pop("Step")
    assert counted == sent  # ListModels, CreateSession, DeleteSession
    assert set(steps_sent) == {"OK", "DEADLINE_EXCEEDED"} and steps_sent["OK"] == 2
    assert steps_counted.pop("OK") == 2
    assert set(steps_counted) <= {"CANCELLED", "DEADLINE_EXCEEDED"}
    assert sum(steps_counted.values()) <= steps_sent["DEADLINE_EXCEEDED"]


# ---------------------------------------------------------------------------- Redis


def test_loadgen_rides_out_its_store_going_down_and_counts_what_the_server_counts(
    on_redis: Durable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """redis-server is killed with SIGKILL as the second Step of a session is sent: the
    server answers UNAVAILABLE while its store is down, the load generator retries until
    it is back (started again on its files), and every Step answer reports the steps run
    once. The server is the same process throughout: its count of every call, the
    UNAVAILABLE answers among them, is the load generator's, exactly."""
    redis_server = on_redis.redis
    assert redis_server is not None
    inside = Inside(monkeypatch)
    killed = threading.Event()
    restarted: concurrent.futures.Future[None] = concurrent.futures.Future()

    def back_once_refused() -> None:
        try:
            inside.wait_for(lambda: "Step UNAVAILABLE" in inside.retried, "a refused Step")
            redis_server.start()
            restarted.set_result(None)
        except BaseException as error:  # handed to the test
            restarted.set_exception(error)

    def kill_at_the_second_step(session: Session) -> None:
        if session.used == 1 and not killed.is_set():
            killed.set()
            redis_server.kill()
            threading.Thread(target=back_once_refused, daemon=True).start()

    inside.before_attempt = kill_at_the_second_step
    before = server_counts(on_redis.server)
    record = loadgen(on_redis, tmp_path / "redis.json", "step", "--metrics-url",
                     on_redis.server.metrics_url, "--requests", "3", "--steps", "3",
                     "--steps-per-call", "4", *PATIENT)()  # fmt: skip
    restarted.result(timeout=WAIT_SECONDS)

    level = one_record_per_request(record, 3)
    assert level["session_steps"] == 12 and inside.steps == [4, 8, 12]
    sent = record["requests_sent"]
    assert sent["Step"]["OK"] == 3 and sent["Step"]["UNAVAILABLE"] >= 1
    assert record["server_requests_during_run"] == sent  # the load generator's own check
    assert settled_counts(on_redis.server, before, sent) == sent

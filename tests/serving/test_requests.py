"""The request log keeps the answers of a session's last `keep` calls with request ids, and
every call still running, whatever the order calls begin, answer and fail in."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np
import pytest

from protos import journal_pb2, tensors
from serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from serving.requests import RecentSessions, RequestLog, answered_step, reply_seed


def kept_by_rule(events: list[tuple[str, str]], keep: int) -> list[str]:
    """The ids the rule keeps, replayed plainly: every id begun and not failed, less the
    oldest answered ones beyond `keep`."""
    order: list[str] = []
    answered: set[str] = set()
    for kind, request_id in events:
        if kind == "begin":
            order.append(request_id)
        elif kind == "fail":
            order.remove(request_id)
        else:
            answered.add(request_id)
            done = [key for key in order if key in answered]
            for key in done[: max(0, len(done) - keep)]:
                order.remove(key)
    return order


def test_the_log_keeps_the_last_answers_and_every_call_still_running() -> None:
    rng = random.Random(5)
    for keep in (1, 2, 5):
        log, count = RequestLog(keep), 0
        events: list[tuple[str, str]] = []
        running: list[str] = []
        for _ in range(400):
            roll = rng.random()
            if roll < 0.45 or not running:
                request_id = f"r{count}"
                count += 1
                log.begin(request_id, b"digest")
                running.append(request_id)
                events.append(("begin", request_id))
            else:
                request_id = running.pop(rng.randrange(len(running)))
                if roll < 0.9:
                    log.finish(request_id, journal_pb2.Response(request_id=request_id))
                    events.append(("finish", request_id))
                else:
                    log.fail(request_id, RuntimeError("failed"))
                    events.append(("fail", request_id))
            assert list(log.entries) == kept_by_rule(events, keep)
            assert [r.request_id for r in log.answered()] == [
                key for key in log.entries if log.entries[key].response is not None
            ]
        assert len(log.answered()) <= keep


def test_answers_loaded_from_the_store_count_toward_the_bound() -> None:
    log = RequestLog(keep=3)
    log.load(journal_pb2.Response(request_id=f"old{i}") for i in range(5))
    assert list(log.entries) == ["old2", "old3", "old4"]
    log.begin("new", b"digest")
    log.finish("new", journal_pb2.Response(request_id="new"))
    assert list(log.entries) == ["old3", "old4", "new"]


@dataclass
class Made:
    id: str


def test_a_repeat_gets_the_first_calls_answer_or_its_error() -> None:
    """`RequestLog.earlier`: the first call under an id starts it (None); a repeat while it
    runs waits for it and gets its answer; another payload is INVALID_ARGUMENT; the waiters
    of a call that failed fail the same way, and the id is then free for a retry."""

    async def scenario() -> None:
        log = RequestLog()
        assert await log.earlier("a", b"d") is None
        repeat = asyncio.ensure_future(log.earlier("a", b"d"))
        await asyncio.sleep(0)  # one turn: the repeat is waiting
        assert not repeat.done()
        with pytest.raises(InvalidArgument, match="different request"):
            await log.earlier("a", b"other")
        outputs = np.arange(6, dtype=np.float32).reshape(2, 3)
        answer = journal_pb2.Response(request_id="a", request_digest=b"d")
        answer.step.step = 7
        tensors.encode_into(answer.step.outputs, outputs)
        log.finish("a", answer)
        assert await repeat is answer
        again = await log.earlier("a", b"d")
        assert again is answer
        got, step = answered_step(again, 7)
        assert step == 7 and np.array_equal(got, outputs)
        cut = journal_pb2.Response(request_id="c", cancelled="cancelled after 1 of 4 steps")
        with pytest.raises(FailedPrecondition, match=r"cancelled after 1 of 4.*at step 9"):
            answered_step(cut, 9)

        assert await log.earlier("b", b"d") is None
        waiter = asyncio.ensure_future(log.earlier("b", b"d"))
        await asyncio.sleep(0)
        log.fail("b", Unavailable("the store is down"))
        with pytest.raises(Unavailable, match="store is down"):
            await waiter
        assert await log.earlier("b", b"d") is None  # the retry runs

    asyncio.run(scenario())


def test_a_turns_seed_is_the_requests_else_the_sessions_else_its_request_ids() -> None:
    assert reply_seed(5, 6, "r") == 5
    assert reply_seed(None, 6, "r") == 6
    derived = reply_seed(None, None, "r")
    assert derived is not None and derived == reply_seed(None, None, "r")  # a retry's
    assert derived != reply_seed(None, None, "s")
    assert reply_seed(None, None, "") is None  # fresh entropy


def test_a_request_id_makes_one_session_whatever_its_repeats_do() -> None:
    """`RecentSessions.once`: a repeat of a finished id gets the first session and makes
    none; a repeat while the first still runs waits for it; a first call that fails or is
    cut short settles the id with an error its waiters get, and a later repeat runs."""

    async def scenario() -> None:
        recent, made = RecentSessions(), 0
        sessions: dict[str, Made] = {}
        gate = asyncio.Event()

        async def make() -> Made:
            nonlocal made
            made += 1
            await gate.wait()
            session = Made(f"s{made}")
            sessions[session.id] = session
            return session

        first = asyncio.ensure_future(recent.once("a", b"d", make, sessions.__getitem__))
        repeat = asyncio.ensure_future(recent.once("a", b"d", make, sessions.__getitem__))
        await asyncio.sleep(0)
        assert made == 1 and not repeat.done()  # the repeat waits for the first
        gate.set()
        assert (await first) is (await repeat) is sessions["s1"]
        assert await recent.once("a", b"d", make, sessions.__getitem__) is sessions["s1"]
        assert made == 1
        with pytest.raises(InvalidArgument, match="different request"):
            await recent.once("a", b"other", make, sessions.__getitem__)

        async def broken() -> Made:
            raise ResourceExhausted("full")

        with pytest.raises(ResourceExhausted):
            await recent.once("b", b"d", broken, sessions.__getitem__)
        assert (await recent.once("b", b"d", make, sessions.__getitem__)).id == "s2"

        gate.clear()
        cut = asyncio.ensure_future(recent.once("c", b"d", make, sessions.__getitem__))
        waiter = asyncio.ensure_future(recent.once("c", b"d", make, sessions.__getitem__))
        await asyncio.sleep(0)
        cut.cancel()
        with pytest.raises(Unavailable, match="cut short"):
            await waiter
        gate.set()
        assert (await recent.once("c", b"d", make, sessions.__getitem__)).id == "s4"

    asyncio.run(scenario())


def test_ids_loaded_out_of_time_order_are_bounded_by_their_age() -> None:
    """A restarted server loads the ids of the sessions it finds in the store's order, not
    by time: the bounds still drop the oldest first (by age, then by count)."""
    recent = RecentSessions(keep_seconds=100.0, keep=2)
    for request_id, made in (("new", 950.0), ("old", 800.0), ("middle", 920.0)):
        recent.load(request_id, b"d", f"session-{request_id}", made)
    assert recent.find("new", b"d", now=1000.0) is not None  # trims: "old" is 200 s old
    assert set(recent.entries) == {"middle", "new"}
    recent.load("older", b"d", "session-older", 930.0)
    recent.find("x", b"d", now=1000.0)  # over the count: the oldest goes, not the last loaded
    assert set(recent.entries) == {"older", "new"}

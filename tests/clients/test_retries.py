"""Retries against a stand-in server (tests/clients/fake_server.py), each library test once
per face: which calls are tried again and after what, the request id every call that changes
something carries (fresh per call, the same on each of its retries, or the caller's), the
time limit of each attempt within the call's deadline, backoff, a lost reply answered from
the server's log (the step count right), and a Generate reply resumed without repeating a
piece, or refused if the retry replies otherwise. What they do against a real server killed
and started again: test_durable.py."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

from clients import NO_RETRIES, AsyncClient, MemserveError, RetryPolicy
from tests.clients.faces import Face
from tests.clients.fake_server import FakeServer
from tests.clients.servers import DIRECT

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
UNTIMED = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05, attempt_timeout=None)
# Any attempt timeout will do where the stand-in holds the attempt's reply: none can come.
SHORT_ATTEMPTS = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05,
                             attempt_timeout=1.0)  # fmt: skip
INPUTS = np.ones((3, 2), np.float32)
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits, hex


def client_of(face: Face, fake: FakeServer, **options: Any) -> AsyncClient:
    options.setdefault("retry", FAST)
    return face.client(fake.target(), options=DIRECT, **options)


# ---------------------------------------------------------------------------- when to retry


@pytest.mark.parametrize("method", ["ListModels", "GetSession", "ExportSession"])
def test_reads_are_retried_until_they_succeed(fake: FakeServer, face: Face, method: str) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next(method, 3)
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "ListModels": client.list_models,
                "GetSession": lambda: client.get_session(session_id),
                "ExportSession": lambda: client.export_session(session_id),
            }
            assert await calls[method]()

    face.run(body)
    assert fake.service.attempts[method] == 4


def test_retries_stop_after_the_policy_attempts(fake: FakeServer, face: Face) -> None:
    fake.service.fail_next("ListModels", 100)

    async def body() -> None:
        async with client_of(face, fake) as client:
            with pytest.raises(MemserveError) as failed:
                await client.list_models()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 4
        assert failed.value.message == "fake: draining"

    face.run(body)
    assert fake.service.attempts["ListModels"] == 4


def seconds_left(fake: FakeServer, method: str) -> list[float | None]:
    """The deadline each call of `method` arrived with, in seconds left, in order."""
    return [left for name, left in fake.service.deadlines if name == method]


def sent_within(timeout: float) -> float:
    """The most a deadline of `timeout` seconds can read on arrival: gRPC rounds it up on
    the wire (to 10 ms between 1 and 10 s, 100 ms up to 100 s), and may send instead one it
    sent before on the connection that is at most 3 % longer."""
    return timeout / 0.97 + 0.1


def test_the_deadline_sent_is_the_call_s_else_the_client_s(fake: FakeServer, face: Face) -> None:
    """As the server sees it arrive, the deadline lies between the call's timeout less the
    time the call took (measured around it) and that timeout, as gRPC rounds it."""

    async def body() -> None:
        timed: list[tuple[float, float]] = []  # (timeout, seconds the call took)
        async with client_of(face, fake, timeout=30, retry=UNTIMED) as client:
            for timeout in (None, 60.0, 5.0):  # the client's; the call's own, longer, shorter
                start = time.monotonic()
                await client.list_models(timeout=timeout)
                timed.append((30.0 if timeout is None else timeout, time.monotonic() - start))
        async with client_of(face, fake, timeout=None, retry=UNTIMED) as patient:
            await patient.list_models()
        *bounded, unbounded = seconds_left(fake, "ListModels")
        assert unbounded is None  # timeout=None: no deadline at all
        for (timeout, took), left in zip(timed, bounded, strict=True):
            assert left is not None and timeout - took <= left <= sent_within(timeout)

    face.run(body)


def test_attempts_share_one_deadline(fake: FakeServer, face: Face) -> None:
    """Each retry is sent with what is left of the call's deadline after the backoffs, not
    with a fresh one."""
    timeout, backoff = 10.0, 0.5
    steady = RetryPolicy(attempts=3, initial_backoff=backoff, multiplier=1.0, jitter=0.0)
    fake.service.fail_next("ListModels", 2)

    async def body() -> None:
        async with face.client(
            fake.target(), retry=steady, timeout=timeout, options=DIRECT
        ) as client:
            await client.list_models()

    face.run(body)
    lefts = seconds_left(fake, "ListModels")
    assert len(lefts) == 3
    for attempt, left in enumerate(lefts):
        # A fresh deadline would read about 10 s; what is left after k backoffs is less.
        assert left is not None and left <= sent_within(timeout - attempt * backoff)
        assert attempt == 0 or sent_within(timeout - attempt * backoff) < timeout


def test_no_retry_whose_backoff_would_outlast_the_deadline(fake: FakeServer, face: Face) -> None:
    # 1000 attempts, the first retry 100 s after the first failure: past the 30 s deadline,
    # so the call gives up at once, with the error it got.
    patient = RetryPolicy(attempts=1000, initial_backoff=100, max_backoff=100, jitter=0.0)
    fake.service.fail_next("ListModels", 1000)

    async def body() -> None:
        async with face.client(fake.target(), retry=patient, timeout=30, options=DIRECT) as client:
            with pytest.raises(MemserveError) as failed:
                await client.list_models()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 1

    face.run(body)
    assert fake.service.attempts["ListModels"] == 1


def test_backoff_grows_exponentially_up_to_its_cap_with_bounded_jitter() -> None:
    exact = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, jitter=0.0)
    assert [exact.backoff(k) for k in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, jitter=0.5)
    waits = [jittered.backoff(3) for _ in range(200)]
    assert all(0.2 <= wait <= 0.4 for wait in waits) and len(set(waits)) > 100
    # A policy bounded by its deadline, not a count (memserve chat's): retry 5000 still
    # waits the cap, where the growth alone is past any float.
    assert exact.backoff(5000) == 0.5
    assert RetryPolicy(initial_backoff=0.0, jitter=0.0).backoff(5000) == 0.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_step_with_expected_step_is_retried(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next("Step", 2)  # refused while draining: nothing ran
            result = await client.step(session_id, INPUTS, expected_step=0)
            assert result.step == 3 and np.array_equal(result.outputs, INPUTS * 2)

    face.run(body)
    assert fake.service.attempts["Step"] == 3


def test_a_delete_whose_reply_was_lost_succeeds(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next("DeleteSession", 1, lose_replies=True)
            await client.delete_session(session_id)  # attempt 2 finds it gone: success
            assert fake.service.attempts["DeleteSession"] == 2
            with pytest.raises(MemserveError, match="NOT_FOUND"):
                await client.delete_session(session_id)  # NOT_FOUND on a first attempt

    face.run(body)


def test_stream_steps_are_never_retried(fake: FakeServer, face: Face) -> None:
    """A StepStream may have steps in flight: a failed one is raised, never repeated."""

    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next("StepStream", 1)
            with pytest.raises(MemserveError) as failed:
                await client.step_stream(session_id).step(INPUTS)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 1

    face.run(body)
    assert fake.service.attempts["StepStream"] == 1


def test_a_step_cancelled_by_the_server_is_not_retried(fake: FakeServer, face: Face) -> None:
    """CANCELLED from the server (a drain cut the call short) may leave some of a Step's
    steps taken: not retried (Generate is: its turn is undone, see below)."""
    fake.service.fail_next("Step", 1, code=grpc.StatusCode.CANCELLED)

    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            with pytest.raises(MemserveError) as failed:
                await client.step(session_id, INPUTS, expected_step=0)
        assert failed.value.code == grpc.StatusCode.CANCELLED and failed.value.attempts == 1

    face.run(body)


# ---------------------------------------------------------------------------- request ids


async def change_everything(client: AsyncClient, **request_ids: str) -> None:
    """One call of each RPC that carries a request id (`request_ids` by method, if any)."""
    info = await client.create_session("fake", request_id=request_ids.get("CreateSession"))
    await client.step(info.session_id, INPUTS, request_id=request_ids.get("Step"))
    await client.generate(info.session_id, "hi", request_id=request_ids.get("Generate")).result()
    await client.fork_session(info.session_id, request_id=request_ids.get("ForkSession"))
    state = (await client.export_session(info.session_id)).state
    await client.import_session(state, request_id=request_ids.get("ImportSession"))


NAMED = ("CreateSession", "Step", "Generate", "ForkSession", "ImportSession")


def test_every_call_that_changes_something_has_a_fresh_request_id(
    fake: FakeServer, face: Face
) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            await change_everything(client)
            await change_everything(client)
            async with await client.session("fake") as session:
                await session.step(INPUTS)
                await session.generate("hi").result()
                await (await session.fork()).delete()

    face.run(body)
    sent = [request_id for method, request_id in fake.service.request_ids if method in NAMED]
    assert len(sent) == 2 * 5 + 4
    assert all(REQUEST_ID.fullmatch(request_id) for request_id in sent), sent
    assert len(set(sent)) == len(sent)  # one per call, never two calls alike


def test_a_request_id_of_the_caller_is_sent_as_it_is(fake: FakeServer, face: Face) -> None:
    mine = {method: f"mine-{method}-{face.name}" for method in NAMED}

    async def body() -> None:
        async with client_of(face, fake) as client:
            await change_everything(client, **mine)
            async with await client.session("fake", request_id="mine-session") as session:
                await session.step(INPUTS, request_id="mine-step")
                await session.generate("hi", request_id="mine-turn").result()
                await (await session.fork(request_id="mine-fork")).delete()

    face.run(body)
    for method in NAMED:
        assert fake.service.ids(method)[0] == mine[method]
    assert fake.service.ids("CreateSession")[1] == "mine-session"
    assert fake.service.ids("Step")[1] == "mine-step"
    assert fake.service.ids("Generate")[1] == "mine-turn"
    assert fake.service.ids("ForkSession")[1] == "mine-fork"


@pytest.mark.parametrize("method", NAMED)
def test_every_retry_of_a_call_sends_its_request_id_again(
    fake: FakeServer, face: Face, method: str
) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next(method, 3)  # refused: nothing ran
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "CreateSession": lambda: client.create_session("fake"),
                "Step": lambda: client.step(session_id, INPUTS),
                "Generate": lambda: client.generate(session_id, "hi").result(),
                "ForkSession": lambda: client.fork_session(session_id),
                "ImportSession": lambda: client.import_session(b"0"),
            }
            assert await calls[method]()

    face.run(body)
    ids = fake.service.ids(method)[-4:]  # CreateSession: the first made the session
    assert len(ids) == 4 and len(set(ids)) == 1 and REQUEST_ID.fullmatch(ids[0])


# ---------------------------------------------------------------------------- lost replies


def test_a_step_whose_reply_was_lost_is_answered_from_the_log(fake: FakeServer, face: Face) -> None:
    """The first attempt ran and its reply was lost: the retry gets its answer, outputs and
    step count, and the steps ran once; with or without expected_step."""

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            fake.service.fail_next("Step", 1, lose_replies=True)
            outputs = await session.step(INPUTS)
            assert np.array_equal(outputs, INPUTS * 2)
            assert session.step_count == fake.service.steps[session.id] == 3
            assert not session.stale
            fake.service.fail_next("Step", 1, lose_replies=True)
            result = await client.step(session.id, INPUTS)  # no expected_step
            assert result.step == fake.service.steps[session.id] == 6
            assert np.array_equal(result.outputs, INPUTS * 2)

    face.run(body)
    ids = fake.service.ids("Step")
    assert len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3] and len(set(ids)) == 2


def test_a_lost_reply_the_server_no_longer_has_fails_clearly(fake: FakeServer, face: Face) -> None:
    """A server that kept no answer for the id (it forgot it: more calls since than it
    keeps) refuses the retry with FAILED_PRECONDITION, thanks to expected_step; the client
    says that the outputs are lost, and the session re-reads its count."""
    fake.service.remember = False

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            fake.service.fail_next("Step", 1, lose_replies=True)  # it runs, its reply is lost
            with pytest.raises(MemserveError) as lost:
                await session.step(INPUTS)
            assert lost.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert lost.value.attempts == 2 and "reply was lost" in lost.value.message
            assert fake.service.steps[session.id] == 3  # stepped once, not twice
            assert (await session.step(INPUTS)).shape == (3, 2)  # the count was re-read
            assert session.step_count == 6

    face.run(body)


@pytest.mark.parametrize("method", ["CreateSession", "ForkSession", "ImportSession"])
def test_a_session_call_whose_reply_was_lost_makes_one_session(
    fake: FakeServer, face: Face, method: str
) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            parent = (await client.create_session("fake")).session_id
            fake.service.fail_next(method, 2, lose_replies=True)
            if method == "CreateSession":
                info = await client.create_session("fake")
            elif method == "ForkSession":
                info = await client.fork_session(parent)
            else:
                info = await client.import_session(b"0")
            assert set(fake.service.steps) == {parent, info.session_id}

    face.run(body)
    assert len(set(fake.service.ids(method)[-3:])) == 1


# ---------------------------------------------------------------------------- attempt deadlines


def test_each_attempt_has_the_policy_s_time_limit_within_the_call_s(
    fake: FakeServer, face: Face
) -> None:
    """The deadline an attempt is sent with is the policy's attempt_timeout, or what is
    left of the call's deadline if that is shorter, even for a call without a deadline."""
    limited = RetryPolicy(attempt_timeout=2.0)

    async def body() -> None:
        async with client_of(face, fake, timeout=30, retry=limited) as client:
            await client.list_models()  # the attempt's 2 s
            await client.list_models(timeout=1.0)  # the call's 1 s
        async with client_of(face, fake, timeout=None, retry=limited) as patient:
            await patient.list_models()  # no deadline for the call, 2 s for the attempt

    face.run(body)
    lefts = seconds_left(fake, "ListModels")
    assert len(lefts) == 3 and all(left is not None for left in lefts)
    assert 1.0 < lefts[0] <= sent_within(2.0) and lefts[1] <= sent_within(1.0)  # type: ignore[operator]
    assert 1.0 < lefts[2] <= sent_within(2.0)  # type: ignore[operator]


def test_the_last_attempt_has_all_the_time_left(fake: FakeServer, face: Face) -> None:
    """An attempt that no other may follow is not cut short: with two attempts the second
    has what is left of the call's deadline; with one (NO_RETRIES) the call's deadline is
    the attempt's, none at all for a call without one."""
    two = RetryPolicy(attempts=2, initial_backoff=0.01, attempt_timeout=2.0)
    fake.service.fail_next("ListModels", 1)

    async def body() -> None:
        async with client_of(face, fake, timeout=30, retry=two) as client:
            await client.list_models()  # fails once, then succeeds
        async with client_of(face, fake, timeout=None, retry=NO_RETRIES) as single:
            await single.list_models()

    face.run(body)
    first, second, single = seconds_left(fake, "ListModels")
    assert first is not None and first <= sent_within(2.0)
    assert second is not None and 20.0 < second <= sent_within(30.0)
    assert single is None


@pytest.mark.parametrize("method", ["Step", "ListModels"])
def test_an_attempt_past_its_time_limit_is_retried(
    fake: FakeServer, face: Face, method: str
) -> None:
    """The first attempt is held by the server (the step ran, its reply never comes): it
    ends with DEADLINE_EXCEEDED after the attempt's limit, and the retry gets the answer
    (the step's from the log: it ran once)."""

    async def body() -> None:
        async with client_of(face, fake, retry=SHORT_ATTEMPTS, timeout=60) as client:
            session_id = (await client.create_session("fake")).session_id
            hold = fake.service.hold(method)
            if method == "Step":
                result = await client.step(session_id, INPUTS)
                assert result.step == fake.service.steps[session_id] == 3
            else:
                assert await client.list_models()
            assert hold.entered.is_set() and not hold.left.is_set()  # the first still waits
            hold.release.set()

    face.run(body)
    assert fake.service.attempts[method] == 2


def test_the_call_s_own_deadline_ends_it_without_retry(fake: FakeServer, face: Face) -> None:
    """DEADLINE_EXCEEDED of the call itself (its attempt had all that was left) is final."""

    async def body() -> None:
        async with client_of(face, fake, timeout=0.5, retry=FAST) as client:  # 10 s attempts
            session_id = (await client.create_session("fake", timeout=60)).session_id
            hold = fake.service.hold("Step")
            with pytest.raises(MemserveError) as late:
                await client.step(session_id, INPUTS)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert late.value.attempts == 1
            hold.release.set()

    face.run(body)
    assert fake.service.attempts["Step"] == 1


# ---------------------------------------------------------------------------- Generate


def test_a_cut_reply_is_resumed_where_the_caller_was(fake: FakeServer, face: Face) -> None:
    """The connection breaks after two pieces: the retry (same id) replies from the start,
    the two pieces are skipped, and the caller sees the reply once, whole."""
    fake.service.cut_replies = [2]

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            generation = session.generate("hello")
            pieces = [piece async for piece in generation]
            assert pieces == ["you", " said", ": ", "hello"]
            assert generation.done is not None and generation.done.text == "you said: hello"
            assert generation.attempts == 2
            assert session.step_count == generation.done.step == fake.service.steps[session.id]
            assert not session.stale

    face.run(body)
    ids = fake.service.ids("Generate")
    assert len(ids) == 2 and ids[0] == ids[1] == inner_id(ids)


def inner_id(ids: list[str]) -> str:
    assert REQUEST_ID.fullmatch(ids[0])
    return ids[0]


def test_a_resumed_reply_may_come_in_other_pieces(fake: FakeServer, face: Face) -> None:
    """What the caller has is skipped by text, not by pieces: the retry's pieces may be cut
    elsewhere; a piece that is partly new gives its new part."""
    fake.service.replies = [["you", " said", ": ", "hi"], ["you s", "aid: h", "i"]]
    fake.service.cut_replies = [2]

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            generation = session.generate("hi")
            assert [piece async for piece in generation] == ["you", " said", ": h", "i"]
            assert generation.done is not None and generation.done.text == "you said: hi"

    face.run(body)


def test_a_retry_that_replies_otherwise_fails_clearly(fake: FakeServer, face: Face) -> None:
    fake.service.replies = [["you", " said", ": ", "hi"], ["they", " said", ": ", "hi"]]
    fake.service.cut_replies = [2]

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            generation = session.generate("hi")
            pieces = []
            with pytest.raises(MemserveError) as diverged:
                async for piece in generation:
                    pieces.append(piece)
            assert pieces == ["you", " said"]  # nothing of the other reply
            assert diverged.value.code == grpc.StatusCode.ABORTED
            assert diverged.value.attempts == 2
            assert "replied differently" in diverged.value.message
            assert "'you said'" in diverged.value.message
            assert generation.done is None and session.stale

    face.run(body)


def test_a_reply_that_does_not_start_is_retried_after_the_attempt_s_limit(
    fake: FakeServer, face: Face
) -> None:
    """The first attempt gets no message (held before its first piece): past
    attempt_timeout the client gives it up, and the retry replies."""

    async def body() -> None:
        async with (
            client_of(face, fake, retry=SHORT_ATTEMPTS, timeout=60) as client,
            await client.session("fake") as session,
        ):
            hold = fake.service.hold("GenerateStart")
            generation = session.generate("hello")
            assert [piece async for piece in generation] == ["you", " said", ": ", "hello"]
            assert generation.attempts == 2 and not hold.left.is_set()
            hold.release.set()

    face.run(body)


def test_a_reply_under_way_has_no_attempt_limit(fake: FakeServer, face: Face) -> None:
    """Once a reply streams, only the call's deadline bounds it (a reply pauses before its
    end while it is written into memory): a pause longer than the attempt's limit, or a
    slow reader, keeps the attempt."""
    assert SHORT_ATTEMPTS.attempt_timeout is not None
    pause = 2 * SHORT_ATTEMPTS.attempt_timeout

    async def body() -> None:
        async with (
            client_of(face, fake, retry=SHORT_ATTEMPTS, timeout=60) as client,
            await client.session("fake") as session,
        ):
            hold = fake.service.hold("Generate")  # the reply stops after its first piece
            generation = session.generate("hello")
            pieces = [await generation.__anext__()]
            releasing = threading.Timer(pause, hold.release.set)  # past the attempt's limit
            releasing.start()
            pieces += [piece async for piece in generation]
            releasing.join()
            assert pieces == ["you", " said", ": ", "hello"] and generation.attempts == 1

    face.run(body)
    assert fake.service.attempts["Generate"] == 1


def test_a_turn_the_server_cancelled_is_retried(fake: FakeServer, face: Face) -> None:
    """CANCELLED from the server (a turn undone: its caller left, or a drain cut it) leaves
    nothing of the turn: Generate is retried, with its request id."""
    fake.service.fail_next("Generate", 1, code=grpc.StatusCode.CANCELLED)

    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            done = await session.generate("hello").result()
            assert done.text == "you said: hello"

    face.run(body)
    assert len(fake.service.ids("Generate")) == 2


def test_a_cancelled_reply_is_not_retried(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client, await client.session("fake") as session:
            generation = session.generate("hello")
            assert await generation.__anext__() == "you"
            generation.cancel()
            assert [piece async for piece in generation] == [] and generation.attempts == 1

    face.run(body)
    assert fake.service.attempts["Generate"] == 1

"""The library's retries against a real memserve on a durable store (`dir:`, and `redis://`
on a real redis-server), each test once per face: the server is killed with SIGKILL while a
Step of many steps runs and while a Generate reply streams, and started again on the same
store (behind a relay, tests/clients/servers.py, as behind a load balancer: the new server
has a new port); it is held (SIGSTOP) past an attempt's time limit; its Redis is killed and
started again. Each time the call the client made completes, its steps are applied once
(outputs and step count bit for bit those of the model stepped alone in process), and the
text a caller read is the reply of one uninterrupted turn. Nothing here sleeps to wait: the
tests wait for what the server reports (GetSession's step count), for the library's log of a
retry, and for processes to stop and start.

What the server does with request ids (repeats, other contents, waiting for the first) is
tested with the server (tests/serving); what the library adds is tested here and against the
stand-in server in test_retries.py.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from safetensors.numpy import load as safe_load

from bench.redis_server import RedisServer
from clients import AsyncClient, AsyncGeneration, RetryPolicy
from models.base import MemoryModel
from tests.clients.faces import Face
from tests.clients.servers import DIRECT, LONG, REPLY, TINY, WAIT_SECONDS, Durable, same_bits
from tests.serving.conftest import Reference, random_inputs

# Patient enough to ride out a restart, however long a busy machine makes it: the call's
# deadline bounds the attempts, not their number (while the server is gone, gRPC fails
# them at once, for as long as its own reconnection backoff lasts).
PATIENT = RetryPolicy(attempts=10_000, initial_backoff=0.05, max_backoff=1.0,
                      attempt_timeout=120)  # fmt: skip
HASTY_ATTEMPTS = RetryPolicy(attempts=10_000, initial_backoff=0.05, max_backoff=1.0,
                             attempt_timeout=1.0)  # fmt: skip
CALL_SECONDS = 600.0


@pytest.fixture(scope="module", params=["dir", "redis"])
def durable(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Durable]:
    if request.param == "dir":
        server = Durable(tmp_path_factory, f"dir:{tmp_path_factory.mktemp('store')}", None)
        yield server
        server.stop()
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis_server:
        server = Durable(tmp_path_factory, redis_server.url, redis_server)
        yield server
        server.stop()


class Retries(logging.Handler):
    """The library's log of its retries (`clients.retry`), to wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.condition = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.condition:
            self.messages.append(record.getMessage())
            self.condition.notify_all()

    def wait_for(self, text: str) -> None:
        with self.condition:
            found = self.condition.wait_for(
                lambda: any(text in message for message in self.messages), WAIT_SECONDS
            )
        assert found, f"no retry after {text!r}: {self.messages}"

    def saw(self, text: str) -> bool:
        with self.condition:
            return any(text in message for message in self.messages)


@pytest.fixture
def retries() -> Iterator[Retries]:
    handler = Retries()
    logger = logging.getLogger("clients.retry")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def same_state(exported: bytes, other: bytes) -> bool:
    """Whether two exports hold the same tensors, bit for bit, and the same metadata (the
    step count among it); the bytes may order them differently."""
    one, two = safe_load(exported), safe_load(other)
    return (
        metadata(exported) == metadata(other)
        and one.keys() == two.keys()
        and all(np.array_equal(one[name], two[name]) for name in one)
    )


def metadata(exported: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", exported[:8])
    found: dict[str, str] = json.loads(exported[8 : 8 + size]).get("__metadata__", {})
    return found


def connect(face: Face, durable: Durable, retry: RetryPolicy = PATIENT) -> AsyncClient:
    return face.client(durable.relay.target, timeout=CALL_SECONDS, retry=retry, options=DIRECT)


# ---------------------------------------------------------------------------- kill -9


def test_a_step_cut_by_a_kill_runs_once_when_retried(
    durable: Durable, face: Face, ntm: MemoryModel, retries: Retries
) -> None:
    """SIGKILL while the server is part way through a Step of LONG steps: none of them was
    committed, so the server started again has the session as it was before the call; the
    client's retry (same request id) runs them, once."""
    rng = np.random.default_rng()
    reference = Reference(ntm)
    first, long, then = (random_inputs(rng, steps, 9) for steps in (3, LONG, 2))

    async def body() -> None:
        async with connect(face, durable) as client, await client.session("ntm-copy") as session:
            assert same_bits(await session.step(first), reference.step(first))
            stepping = face.begin(lambda: session.step(long))
            await face.aside(lambda: durable.wait_for_steps(session.id, 3, 3 + LONG))
            await face.aside(lambda: durable.restart(session.id, committed=3))
            assert same_bits(await stepping(), reference.step(long))
            assert session.step_count == reference.steps == 3 + LONG
            assert (await session.info()).step == reference.steps
            assert same_bits(await session.step(then), reference.step(then))  # it goes on

    face.run(body)
    assert retries.saw("Step attempt 1 failed with UNAVAILABLE")


def test_a_reply_cut_by_a_kill_resumes_as_one_uninterrupted_reply(
    durable: Durable, face: Face, retries: Retries
) -> None:
    """SIGKILL while a reply streams: the turn was not committed, so the server started
    again has the session as before the turn; the retry runs the turn again, with the same
    randomness (derived from its request id), and the caller reads on from where it was.
    What it read is the reply of the same turn run without interruption on a copy of the
    session from before it, and the two sessions end alike."""
    text = "tell me a long story"

    async def body() -> None:
        async with connect(face, durable) as client, await client.session(TINY) as session:
            await session.generate("hi !", max_tokens=3).result()  # some history
            before = await session.export()
            generation = session.generate(text, max_tokens=REPLY)
            pieces = [await generation.__anext__()]  # the reply streams
            committed = session.step_count  # the count before the turn
            await face.aside(lambda: durable.restart(session.id, committed))
            pieces += [piece async for piece in generation]
            done = generation.done
            assert done is not None and generation.attempts >= 2
            assert done.completion_tokens == REPLY
            assert session.step_count == done.step == (await session.info()).step

            async with face.session(client, await client.import_session(before)) as copy:
                twin = copy.generate(text, max_tokens=REPLY, request_id=generation.request_id)
                twin_pieces = [piece async for piece in twin]
                assert twin.attempts == 1 and twin.done is not None
                assert "".join(pieces) == "".join(twin_pieces)
                assert done.text == twin.done.text and done.step == twin.done.step
                assert same_state(await session.export(), await copy.export())

    face.run(body)
    assert retries.saw("Generate attempt 1 failed with UNAVAILABLE")


# ---------------------------------------------------------------------------- held, stalled


async def read_all(generation: AsyncGeneration) -> list[str]:
    return [piece async for piece in generation]


def only_once(durable: Durable) -> None:
    """What does not depend on the store runs with one (the directory), to spare time."""
    if durable.redis is not None:
        pytest.skip("the store plays no part: run with the directory store only")


def test_a_step_past_its_attempt_s_limit_is_answered_by_its_first_run(
    durable: Durable, face: Face, ntm: MemoryModel, retries: Retries
) -> None:
    """The server is stopped (SIGSTOP) while a Step runs, past the attempt's time limit:
    the attempt ends DEADLINE_EXCEEDED and is retried with its request id. The server, let
    go, runs the first to its end (a Step with an id does, its caller gone or not) and
    answers the retry with its outputs: the steps ran once."""
    only_once(durable)
    rng = np.random.default_rng()
    reference = Reference(ntm)
    long, then = random_inputs(rng, LONG, 9), random_inputs(rng, 2, 9)

    async def body() -> None:
        async with (
            connect(face, durable, HASTY_ATTEMPTS) as client,
            await client.session("ntm-copy") as session,
        ):
            stepping = face.begin(lambda: session.step(long))
            await face.aside(lambda: durable.wait_for_steps(session.id, 0, LONG))
            with durable.server.held():
                await face.aside(lambda: retries.wait_for("Step attempt 1 failed with DEADLINE"))
            assert same_bits(await stepping(), reference.step(long))
            assert session.step_count == (await session.info()).step == LONG
            assert same_bits(await session.step(then), reference.step(then))

    face.run(body)


def test_a_turn_past_its_attempt_s_limit_is_sent_again(
    durable: Durable, face: Face, retries: Retries
) -> None:
    """The server is stopped (SIGSTOP) as a turn is sent, past the attempt's time limit:
    the client gives the attempt up and sends it again (and again while the server stays
    stopped). Let go, the server drops the attempts whose callers left (undoing what one
    may have begun; a retry waiting for it is answered CANCELLED, and retried), and the
    reply is that of the turn run once: what an uninterrupted turn on a copy of the session
    replies. Its long pause at the end (the reply written into memory) is no stall."""
    only_once(durable)
    text = "tell me a long story"

    async def body() -> None:
        async with (
            connect(face, durable, HASTY_ATTEMPTS) as client,
            await client.session(TINY) as session,
        ):
            before = await session.export()
            with durable.server.held():
                generation = session.generate(text, max_tokens=REPLY)
                reading = face.begin(lambda: read_all(generation))
                await face.aside(lambda: retries.wait_for("Generate attempt 1 failed with DEAD"))
            pieces = await reading()
            assert generation.done is not None and generation.attempts >= 2
            async with face.session(client, await client.import_session(before)) as copy:
                twin = copy.generate(text, max_tokens=REPLY, request_id=generation.request_id)
                assert "".join(pieces) == "".join([piece async for piece in twin])
                assert same_state(await session.export(), await copy.export())

    face.run(body)


# ---------------------------------------------------------------------------- Redis


def test_a_step_rides_out_its_store_going_down(
    durable: Durable, face: Face, ntm: MemoryModel, retries: Retries
) -> None:
    """redis-server is killed with SIGKILL: the server answers UNAVAILABLE while its store
    is down, the client retries until it is back (started again on its files), and the
    call's steps are applied once."""
    redis_server = durable.redis
    if redis_server is None:
        pytest.skip("a directory store does not go down")
    rng = np.random.default_rng()
    reference = Reference(ntm)
    first, second = random_inputs(rng, 3, 9), random_inputs(rng, 5, 9)

    async def body() -> None:
        async with connect(face, durable) as client, await client.session("ntm-copy") as session:
            assert same_bits(await session.step(first), reference.step(first))
            redis_server.kill()
            stepping = face.begin(lambda: session.step(second))
            await face.aside(lambda: retries.wait_for("Step attempt 1 failed with UNAVAILABLE"))
            await face.aside(redis_server.start)
            assert same_bits(await stepping(), reference.step(second))
            assert session.step_count == (await session.info()).step == 8

    face.run(body)


@pytest.fixture(autouse=True)
def _server_is_up(durable: Durable) -> Iterator[None]:
    """Each test finds the server serving (a test that failed half way may have left it
    held or killed)."""
    if durable.server.process is None or durable.server.process.poll() is not None:
        durable.server = durable._start()
    yield

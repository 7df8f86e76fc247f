"""What the clients do on the wire, against a stand-in server (tests/clients/fake_server.py),
each library test once per face: retries on UNAVAILABLE for the calls that are safe to
repeat and only those, what a lost reply turns into, the deadline each attempt carries and
backoff within it, the bearer token on every call, and TLS (server certificate, name
override, mutual TLS), from the library, `memserve chat` and `memserve loadgen`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clients import TLS, AsyncClient, MemserveError, RetryPolicy
from clients.channel import SESSION_HEADER
from memserve.cli import main
from tests.clients.faces import Face
from tests.clients.fake_server import Certificates, FakeServer
from tests.clients.servers import DIRECT, ROOT, subprocess_env

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
INPUTS = np.ones((3, 2), np.float32)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    try:
        return Certificates.make(tmp_path_factory.mktemp("certificates"))
    except FileNotFoundError:
        pytest.skip("no openssl command to make certificates with")


@pytest.fixture
def tls_fake(certificates: Certificates) -> Iterator[FakeServer]:
    server = FakeServer(certificates)
    yield server
    server.stop()


def client_of(face: Face, fake: FakeServer, **options: Any) -> AsyncClient:
    return face.client(fake.target(), retry=FAST, options=DIRECT, **options)


# ---------------------------------------------------------------------------- retries


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
        async with client_of(face, fake, timeout=30) as client:
            for timeout in (None, 60.0, 5.0):  # the client's; the call's own, longer, shorter
                start = time.monotonic()
                await client.list_models(timeout=timeout)
                timed.append((30.0 if timeout is None else timeout, time.monotonic() - start))
        async with client_of(face, fake, timeout=None) as patient:
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
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    "method", ["CreateSession", "ForkSession", "ImportSession", "Generate", "StepStream", "Step"]
)
def test_calls_unsafe_to_repeat_are_tried_once(fake: FakeServer, face: Face, method: str) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next(method, 1)
            with pytest.raises(MemserveError) as failed:
                if method == "CreateSession":
                    await client.create_session("fake")
                elif method == "ForkSession":
                    await client.fork_session(session_id)
                elif method == "ImportSession":
                    await client.import_session(b"0")
                elif method == "Generate":
                    await client.generate(session_id, "hello").result()
                elif method == "StepStream":
                    await client.step_stream(session_id).step(INPUTS)
                else:  # Step without expected_step
                    await client.step(session_id, INPUTS)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 1

    face.run(body)
    assert fake.service.attempts[method] == (2 if method == "CreateSession" else 1)


def test_step_with_expected_step_is_retried(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next("Step", 2)  # refused while draining: nothing ran
            result = await client.step(session_id, INPUTS, expected_step=0)
            assert result.step == 3 and np.array_equal(result.outputs, INPUTS * 2)

    face.run(body)
    assert fake.service.attempts["Step"] == 3


def test_a_step_whose_reply_was_lost_is_not_run_twice(fake: FakeServer, face: Face) -> None:
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


# ---------------------------------------------------------------------------- token


async def exercise_every_call(client: AsyncClient) -> None:
    await client.list_models()
    async with await client.session("fake") as session:
        await session.step(INPUTS)
        async with session.step_stream() as stream:
            await stream.step(INPUTS)
        await session.generate("hi").result()
        await (await session.fork()).delete()
        await client.import_session(await session.export())
        await session.info()


def test_bearer_token_is_sent_with_every_call(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake, token="s3cret") as client:
            await exercise_every_call(client)

    face.run(body)
    methods = {method for method, _ in fake.service.metadata}
    assert len(methods) == 10, methods
    assert all(m["authorization"] == "Bearer s3cret" for _, m in fake.service.metadata)


def test_no_token_no_authorization(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            await exercise_every_call(client)

    face.run(body)
    assert fake.service.calls_with("authorization") == []


# ---------------------------------------------------------------------------- TLS


def test_tls_checks_the_server_certificate(
    tls_fake: FakeServer, certificates: Certificates, face: Face
) -> None:
    target = tls_fake.target(tls_fake.tls_port)
    trusted = TLS.from_files(certificates.server_cert, server_name="memserve.test")
    wrong_name = TLS.from_files(certificates.server_cert)  # the cert does not name 127.0.0.1
    untrusted = TLS(server_name="memserve.test")  # default roots do not hold a self-signed one

    async def body() -> None:
        async with face.client(target, tls=trusted, token="x") as client:
            assert (await client.list_models())[0].name == "fake"
        for settings in (wrong_name, untrusted):
            async with face.client(target, tls=settings, timeout=60) as client:
                with pytest.raises(MemserveError) as refused:
                    await client.list_models()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        async with face.client(target, timeout=60, retry=FAST) as plaintext:
            with pytest.raises(MemserveError, match="UNAVAILABLE"):
                await plaintext.list_models()

    face.run(body)
    assert tls_fake.service.calls_with("authorization") == ["ListModels"]


def test_mutual_tls_sends_the_client_certificate(
    tls_fake: FakeServer, certificates: Certificates, face: Face
) -> None:
    target = tls_fake.target(tls_fake.mtls_port)
    mutual = TLS.from_files(
        certificates.server_cert, certificates.client_cert, certificates.client_key,
        server_name="memserve.test",
    )  # fmt: skip
    anonymous = TLS.from_files(certificates.server_cert, server_name="memserve.test")

    async def body() -> None:
        async with face.client(target, tls=mutual) as client:
            assert (await client.list_models())[0].name == "fake"
        async with face.client(target, tls=anonymous, timeout=60, retry=FAST) as client:
            with pytest.raises(MemserveError, match="UNAVAILABLE"):
                await client.list_models()

    face.run(body)
    with pytest.raises(ValueError, match="private key"):
        TLS(certificate_chain=b"cert only")


def test_chat_options_map_onto_tls_and_token(
    tls_fake: FakeServer, certificates: Certificates
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "chat", "--target",
         tls_fake.target(tls_fake.mtls_port), "--model", "fake", "--ca",
         str(certificates.server_cert), "--cert", str(certificates.client_cert), "--key",
         str(certificates.client_key), "--server-name", "memserve.test"],
        input="hello there\n", cwd=ROOT, env={**subprocess_env(), "MEMSERVE_TOKEN": "from-env"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "you said: hello there\n"
    assert {m["authorization"] for _, m in tls_fake.service.metadata} == {"Bearer from-env"}
    called = {"ListModels", "CreateSession", "Generate", "DeleteSession"}  # the model checked
    assert set(tls_fake.service.attempts) == called
    assert tls_fake.service.steps == {}  # the chat deleted its session at the end


def test_loadgen_options_map_onto_tls_and_token(
    tls_fake: FakeServer, certificates: Certificates, tmp_path: Path
) -> None:
    out = tmp_path / "run.json"
    code = main(["loadgen", "step", "--target", tls_fake.target(tls_fake.mtls_port), "--model",
                 "fake", "--ca", str(certificates.server_cert), "--cert",
                 str(certificates.client_cert), "--key", str(certificates.client_key),
                 "--server-name", "memserve.test", "--token", "s3cret", "--no-metrics",
                 "--no-progress", "--concurrency", "2", "--warmup", "0", "--requests", "6",
                 "--steps", "3", "--json", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["levels"][0]["requests"]["ok"] == 6
    assert record["settings"]["tls"] is True and record["settings"]["token_sent"] is True
    assert "s3cret" not in out.read_text() and "--token '***'" in record["command"]
    methods = {method for method, _ in tls_fake.service.metadata}
    assert methods == {"ListModels", "CreateSession", "Step", "DeleteSession"}
    assert {m["authorization"] for _, m in tls_fake.service.metadata} == {"Bearer s3cret"}


# ---------------------------------------------------------------------------- routing


NO_SESSION = {"ListModels", "CreateSession", "ImportSession"}


def test_calls_naming_a_session_carry_its_header(fake: FakeServer, face: Face) -> None:
    """What an edge in front of several servers routes by (`memserve cluster`'s Envoy)."""

    async def body() -> None:
        async with client_of(face, fake) as client:
            await exercise_every_call(client)

    face.run(body)
    named = [(method, m) for method, m in fake.service.metadata if method not in NO_SESSION]
    every = {"Step", "StepStream", "Generate", "GetSession", "ExportSession", "ForkSession",
             "DeleteSession"}  # fmt: skip
    assert {method for method, _ in named} >= every
    assert all(m.get(SESSION_HEADER) for _, m in named), named
    assert not any(SESSION_HEADER in m for method, m in fake.service.metadata
                   if method in NO_SESSION)  # fmt: skip


def test_loadgen_sends_the_session_header(fake: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    code = main(["loadgen", "step", "--target", fake.target(), "--model", "fake",
                 "--no-metrics", "--no-progress", "--concurrency", "2", "--warmup", "0",
                 "--requests", "4", "--steps", "2", "--json", str(out)])  # fmt: skip
    assert code == 0
    sent = {method: m.get(SESSION_HEADER) for method, m in fake.service.metadata}
    assert sent["Step"] and sent["DeleteSession"], sent
    assert sent["ListModels"] is None and sent["CreateSession"] is None

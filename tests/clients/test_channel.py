"""What the clients do on the wire, against a stand-in server (tests/clients/fake_server.py):
retries on UNAVAILABLE for the calls that are safe to repeat and only those, what a lost
reply turns into, backoff within the deadline, the bearer token on every call, and TLS
(server certificate, name override, mutual TLS), from the library, `memserve chat` and
`memserve loadgen`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients import TLS, AsyncClient, Client, MemserveError, RetryPolicy
from memserve.cli import main
from tests.clients.fake_server import Certificates, FakeServer
from tests.clients.servers import DIRECT, ROOT, subprocess_env

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
INPUTS = np.ones((3, 2), np.float32)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


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


def client_of(fake: FakeServer, **options: object) -> Client:
    return Client(fake.target(), retry=FAST, options=DIRECT, **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- retries


@pytest.mark.parametrize("method", ["ListModels", "GetSession", "ExportSession"])
def test_reads_are_retried_until_they_succeed(fake: FakeServer, method: str) -> None:
    with client_of(fake) as client:
        session_id = client.create_session("fake").session_id
        fake.service.fail_next(method, 3)
        calls: dict[str, Callable[[], object]] = {
            "ListModels": client.list_models,
            "GetSession": lambda: client.get_session(session_id),
            "ExportSession": lambda: client.export_session(session_id),
        }
        assert calls[method]()
        assert fake.service.attempts[method] == 4


def test_retries_stop_after_the_policy_attempts(fake: FakeServer) -> None:
    fake.service.fail_next("ListModels", 100)
    with client_of(fake) as client, pytest.raises(MemserveError) as failed:
        client.list_models()
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 4
    assert failed.value.message == "fake: draining"
    assert fake.service.attempts["ListModels"] == 4


def test_retries_stay_within_the_deadline(fake: FakeServer) -> None:
    # 1000 attempts 0.2 s apart would take 200 s; within a deadline of 0.9 s, k attempts
    # need k - 1 backoffs, so there is room for at most 5, however slow each attempt is.
    patient = RetryPolicy(attempts=1000, initial_backoff=0.2, multiplier=1.0, jitter=0.0)
    with Client(fake.target(), retry=patient, options=DIRECT, timeout=0.9) as client:
        client.list_models()  # connected: an attempt now takes milliseconds, not the deadline
        fake.service.fail_next("ListModels", 1000)
        start = time.monotonic()
        with pytest.raises(MemserveError) as failed:
            client.list_models()
        elapsed = time.monotonic() - start
    # Given up when the next backoff would outlast the deadline (UNAVAILABLE), or, on a
    # machine slow enough, when the deadline cut the last attempt short.
    assert failed.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 2 <= failed.value.attempts <= 5  # retried, and stopped by the deadline
    refused = fake.service.attempts["ListModels"] - 1  # less the first call, answered
    if failed.value.code == grpc.StatusCode.UNAVAILABLE:
        assert refused == failed.value.attempts  # each attempt was one refused call
    assert refused <= 5
    assert elapsed < 30  # nowhere near the policy's 200 s


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
def test_calls_unsafe_to_repeat_are_tried_once(fake: FakeServer, method: str) -> None:
    with client_of(fake) as client:
        session_id = client.create_session("fake").session_id
        fake.service.fail_next(method, 1)
        with pytest.raises(MemserveError) as failed:
            if method == "CreateSession":
                client.create_session("fake")
            elif method == "ForkSession":
                client.fork_session(session_id)
            elif method == "ImportSession":
                client.import_session(b"0")
            elif method == "Generate":
                client.generate(session_id, "hello").result()
            elif method == "StepStream":
                client.step_stream(session_id).step(INPUTS)
            else:  # Step without expected_step
                client.step(session_id, INPUTS)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.attempts == 1
        assert fake.service.attempts[method] == (2 if method == "CreateSession" else 1)


def test_step_with_expected_step_is_retried(fake: FakeServer) -> None:
    with client_of(fake) as client:
        session_id = client.create_session("fake").session_id
        fake.service.fail_next("Step", 2)  # refused while draining: nothing ran
        result = client.step(session_id, INPUTS, expected_step=0)
        assert result.step == 3 and np.array_equal(result.outputs, INPUTS * 2)
        assert fake.service.attempts["Step"] == 3


def test_a_step_whose_reply_was_lost_is_not_run_twice(fake: FakeServer) -> None:
    with client_of(fake) as client, client.session("fake") as session:
        fake.service.fail_next("Step", 1, lose_replies=True)  # it runs, its reply is lost
        with pytest.raises(MemserveError) as lost:
            session.step(INPUTS)
        assert lost.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert lost.value.attempts == 2 and "reply was lost" in lost.value.message
        assert fake.service.steps[session.id] == 3  # stepped once, not twice
        assert session.step(INPUTS).shape == (3, 2)  # the session re-read its count
        assert session.step_count == 6


def test_a_delete_whose_reply_was_lost_succeeds(fake: FakeServer) -> None:
    with client_of(fake) as client:
        session_id = client.create_session("fake").session_id
        fake.service.fail_next("DeleteSession", 1, lose_replies=True)
        client.delete_session(session_id)  # attempt 2 finds it gone: success
        assert fake.service.attempts["DeleteSession"] == 2
        with pytest.raises(MemserveError, match="NOT_FOUND"):
            client.delete_session(session_id)  # NOT_FOUND on a first attempt is an error


def test_async_client_retries_the_same_way(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.target(), retry=FAST, options=DIRECT) as client:
            session_id = (await client.create_session("fake")).session_id
            fake.service.fail_next("GetSession", 2)
            fake.service.fail_next("CreateSession", 1)
            assert (await client.get_session(session_id)).step == 0
            with pytest.raises(MemserveError) as failed:
                await client.create_session("fake")
            assert failed.value.attempts == 1
            fake.service.fail_next("Step", 1, lose_replies=True)
            with pytest.raises(MemserveError, match="FAILED_PRECONDITION"):
                await client.step(session_id, INPUTS, expected_step=0)

    asyncio.run(main())
    assert fake.service.attempts["GetSession"] == 3
    assert fake.service.attempts["Step"] == 2


# ---------------------------------------------------------------------------- token


def exercise_every_call(client: Client) -> None:
    client.list_models()
    with client.session("fake") as session:
        session.step(INPUTS)
        with session.step_stream() as stream:
            stream.step(INPUTS)
        session.generate("hi").result()
        session.fork().delete()
        client.import_session(session.export())
        session.info()


def test_bearer_token_is_sent_with_every_call(fake: FakeServer) -> None:
    with client_of(fake, token="s3cret") as client:
        exercise_every_call(client)
    methods = {method for method, _ in fake.service.metadata}
    assert len(methods) == 10, methods
    assert all(m["authorization"] == "Bearer s3cret" for _, m in fake.service.metadata)


def test_async_bearer_token_is_sent(fake: FakeServer) -> None:
    async def main() -> None:
        async with (
            AsyncClient(fake.target(), token="t0ken", options=DIRECT) as client,
            await client.session("fake") as session,
        ):
            await session.step(INPUTS)
            await session.generate("hi").result()

    asyncio.run(main())
    assert len(fake.service.metadata) == 4
    assert all(m["authorization"] == "Bearer t0ken" for _, m in fake.service.metadata)


def test_no_token_no_authorization(fake: FakeServer) -> None:
    with client_of(fake) as client:
        client.list_models()
    assert fake.service.calls_with("authorization") == []


# ---------------------------------------------------------------------------- TLS


def test_tls_checks_the_server_certificate(
    tls_fake: FakeServer, certificates: Certificates
) -> None:
    trusted = TLS.from_files(certificates.server_cert, server_name="memserve.test")
    with Client(tls_fake.target(tls_fake.tls_port), tls=trusted, token="x") as client:
        assert client.list_models()[0].name == "fake"
    assert tls_fake.service.calls_with("authorization") == ["ListModels"]

    wrong_name = TLS.from_files(certificates.server_cert)  # the cert does not name 127.0.0.1
    untrusted = TLS(server_name="memserve.test")  # default roots do not hold a self-signed one
    for settings in (wrong_name, untrusted):
        client = Client(tls_fake.target(tls_fake.tls_port), tls=settings, timeout=10)
        with client, pytest.raises(MemserveError) as refused:
            client.list_models()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    plaintext = Client(tls_fake.target(tls_fake.tls_port), timeout=10, retry=FAST)
    with plaintext, pytest.raises(MemserveError, match="UNAVAILABLE"):
        plaintext.list_models()


def test_mutual_tls_sends_the_client_certificate(
    tls_fake: FakeServer, certificates: Certificates
) -> None:
    target = tls_fake.target(tls_fake.mtls_port)
    mutual = TLS.from_files(
        certificates.server_cert, certificates.client_cert, certificates.client_key,
        server_name="memserve.test",
    )  # fmt: skip
    with Client(target, tls=mutual) as client:
        assert client.list_models()
    anonymous = TLS.from_files(certificates.server_cert, server_name="memserve.test")
    client = Client(target, tls=anonymous, timeout=10, retry=FAST)
    with client, pytest.raises(MemserveError, match="UNAVAILABLE"):
        client.list_models()
    with pytest.raises(ValueError, match="private key"):
        TLS(certificate_chain=b"cert only")


def test_async_client_over_mutual_tls(tls_fake: FakeServer, certificates: Certificates) -> None:
    mutual = TLS.from_files(
        certificates.server_cert, certificates.client_cert, certificates.client_key,
        server_name="memserve.test",
    )  # fmt: skip

    async def main() -> None:
        async with AsyncClient(tls_fake.target(tls_fake.mtls_port), tls=mutual) as client:
            assert (await client.list_models())[0].name == "fake"

    asyncio.run(main())


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

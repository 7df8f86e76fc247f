"""What the clients send on the wire besides the calls, against a stand-in server
(tests/clients/fake_server.py), each library test once per face: the bearer token on every
call, and TLS (server certificate, name override, mutual TLS), from the library, `memserve
chat` and `memserve loadgen`. Retries, deadlines and request ids: test_retries.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clients import TLS, AsyncClient, MemserveError, RetryPolicy
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

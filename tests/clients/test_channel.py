"""What the clients send on the wire besides the calls, where only a stand-in server
(tests/clients/fake_server.py) can see it, each library test once per face: without a token,
no authorization header at all. The token on every call and TLS (the server's certificate
and name, mutual TLS), from the library, `memserve chat` and `memserve loadgen`, are tested
against a real server that asks for both: test_secure_server.py. The session header an edge
routes by, on every call that names a session. Retries, deadlines and request ids:
test_retries.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients import TLS, AsyncClient, RetryPolicy
from clients.channel import SESSION_HEADER
from memserve.cli import main
from tests.clients.faces import Face
from tests.clients.fake_server import FakeServer
from tests.clients.servers import DIRECT

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
INPUTS = np.ones((3, 2), np.float32)


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


def test_no_token_no_authorization(fake: FakeServer, face: Face) -> None:
    async def body() -> None:
        async with client_of(face, fake) as client:
            await exercise_every_call(client)

    face.run(body)
    assert len({method for method, _ in fake.service.metadata}) == 10  # every RPC
    assert fake.service.calls_with("authorization") == []


# ---------------------------------------------------------------------------- TLS


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="private key"):
        TLS(certificate_chain=b"cert only")


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

"""The clients against a real server that asks for mutual TLS and an API key: the library
(both faces), `memserve chat` and `memserve loadgen` connect with a CA, a client certificate
and a key, their calls come out as in process, and what the server refuses comes back as the
status it sent. The certificates are made by `openssl` (tests/serving/certificates.py)."""

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

from bench.child_server import ServerProcess
from clients import TLS, MemserveError, RetryPolicy
from memserve.cli import main
from models.base import MemoryModel
from serving.tenants import hash_key, new_key
from tests.clients.faces import Face
from tests.clients.servers import DIRECT, ROOT, TINY, close_to, served, subprocess_env
from tests.serving.certificates import Pki, make_pki
from tests.serving.client import metric, scrape
from tests.serving.conftest import Reference, random_inputs

KEY = new_key()
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ServerProcess]:
    """ntm-copy and the small VMED behind mutual TLS, for the one tenant `acme` of KEY."""
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(f'[tenants.acme]\nkeys = ["{hash_key(KEY)}"]\n')
    with served(
        tmp_path_factory,
        args=(
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca), "--auth-keys", str(keys),
        ),
    ) as process:  # fmt: skip
        yield process


def mutual(pki: Pki) -> TLS:
    return TLS.from_files(pki.ca, pki.client_cert, pki.client_key)


def test_the_library_steps_over_mutual_tls_with_a_key(
    server: ServerProcess, pki: Pki, face: Face, ntm: MemoryModel
) -> None:
    rng = np.random.default_rng()
    reference = Reference(ntm)

    async def body() -> None:
        async with face.client(
            server.target, tls=mutual(pki), token=KEY, timeout=60, options=DIRECT
        ) as client:
            assert {model.name for model in await client.list_models()} == {"ntm-copy", TINY}
            async with await client.session("ntm-copy") as session:
                for steps in (1, 12):  # 12: over a launch's default eight
                    inputs = random_inputs(rng, steps, 9)
                    assert close_to(await session.step(inputs), reference.step(inputs))
                async with session.step_stream() as stream:
                    inputs = random_inputs(rng, 1, 9)
                    assert close_to((await stream.step(inputs)).outputs, reference.step(inputs))
                twin = reference.fork()
                async with await session.fork() as child:
                    inputs = random_inputs(rng, 3, 9)
                    assert close_to(await child.step(inputs), twin.step(inputs))
                copy = await client.import_session(await session.export())
                assert copy.step == reference.steps
                await client.delete_session(copy.session_id)
            async with await client.session(TINY) as chat:
                reply = await chat.generate("hello", max_tokens=4).result()
                assert reply.completion_tokens == 4

    face.run(body)


def test_what_the_server_refuses_comes_back_as_its_status(
    server: ServerProcess, pki: Pki, face: Face
) -> None:
    anonymous = TLS.from_files(pki.ca)  # the server's CA, but no client certificate
    cases: list[tuple[dict[str, Any], grpc.StatusCode]] = [
        (dict(tls=mutual(pki)), grpc.StatusCode.UNAUTHENTICATED),  # no key
        (dict(tls=mutual(pki), token=new_key()), grpc.StatusCode.UNAUTHENTICATED),
        (dict(tls=anonymous, token=KEY), grpc.StatusCode.UNAVAILABLE),  # handshake refused
        (dict(token=KEY), grpc.StatusCode.UNAVAILABLE),  # plaintext to a TLS port
    ]

    async def body() -> None:
        for options, code in cases:
            async with face.client(
                server.target, timeout=30, retry=NO_RETRY, options=DIRECT, **options
            ) as client:
                with pytest.raises(MemserveError) as refused:
                    await client.list_models()
                assert refused.value.code == code, options

    face.run(body)


def test_chat_talks_over_mutual_tls_with_a_key_from_the_environment(
    server: ServerProcess, pki: Pki
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memserve", "chat", "--target", server.target, "--model", TINY,
         "--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key),
         "--max-tokens", "5"],
        input="hello there\n", cwd=ROOT, env={**subprocess_env(), "MEMSERVE_TOKEN": KEY},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the chat printed no reply"
    refused = subprocess.run(
        [sys.executable, "-m", "memserve", "chat", "--target", server.target, "--model", TINY,
         "--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)],
        input="hello\n", cwd=ROOT, env={**subprocess_env(), "MEMSERVE_TOKEN": new_key()},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr


def test_loadgen_counts_what_the_server_counts_over_mutual_tls(
    server: ServerProcess, pki: Pki, tmp_path: Path
) -> None:
    def answered() -> tuple[float, float, float]:
        """Steps answered OK; calls answered OK, of the tenant and of every method."""
        samples = scrape(server.metrics_url)
        return (
            metric(samples, "memserve_request_duration_seconds_count", method="Step", code="OK"),
            metric(samples, "memserve_tenant_requests_total", tenant="acme", code="OK"),
            metric(samples, "memserve_request_duration_seconds_count", code="OK"),
        )

    before = answered()
    out = tmp_path / "run.json"
    code = main(["loadgen", "step", "--target", server.target, "--model", "ntm-copy",
                 "--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key",
                 str(pki.client_key), "--token", KEY, "--no-metrics", "--no-progress",
                 "--concurrency", "2", "--warmup", "0", "--requests", "10", "--steps", "20",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["levels"][0]["requests"]["ok"] == 10
    assert record["settings"]["tls"] is True and record["settings"]["token_sent"] is True
    assert KEY not in out.read_text()
    steps, tenant, every = (after - first for after, first in zip(answered(), before, strict=True))
    assert steps == 10 and tenant == every  # every call was the tenant's, and counted

"""The v2 API on a server with API keys, through Triton's own client: every call needs a
key (on a stream, the stream's), a sequence id is a name within its tenant (the same id of
another tenant is another sequence, and another tenant's session id is no name at all), the
step-rate quota holds for v2 calls as for v1, and a quota refuses a stream's message without
ending the stream."""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bench.child_server import ServerProcess
from serving.tenants import hash_key, new_key
from tests.serving.client import metric, scrape

MODEL = "ntm-copy"
KEYS = {"acme": new_key(), "globex": new_key(), "one_call": new_key(), "one_step": new_key()}
QUOTAS = {"one_call": "max_concurrent_calls = 1", "one_step": "steps_per_second = 1"}
NEVER_STARTED = "must specify the START flag on the first request of the sequence"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("server")
    lines = []
    for name, key in KEYS.items():
        lines += [f"[tenants.{name}]", f'keys = ["{hash_key(key)}"]', QUOTAS.get(name, "")]
    keys = directory / "keys.toml"
    keys.write_text("\n".join(lines) + "\n")
    # "--model-timeout": a test stops the model process on purpose
    flags = ("--models", MODEL, "--auth-keys", str(keys), "--model-timeout", "600")
    with ServerProcess(directory, *flags) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(
        server.target, channel_args=[("grpc.enable_http_proxy", 0)]
    ) as connection:
        yield connection


def bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def steps(count: int = 1) -> triton.InferInput:
    tensor = triton.InferInput("INPUT", [count, 9], "FP32")
    tensor.set_data_from_numpy(np.full((count, 9), 0.5, np.float32))
    return tensor


def infer(
    client: triton.InferenceServerClient, tenant: str | None, sequence_id: int | str, **flags: Any
) -> Any:
    headers = bearer(tenant) if tenant else None
    return client.infer(MODEL, [steps()], sequence_id=sequence_id, headers=headers, **flags)


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


def step_count(result: Any) -> int:
    return int(result.as_numpy("STEP")[0])


def test_every_inference_call_needs_a_key(client: triton.InferenceServerClient) -> None:
    for headers in (None, {"authorization": f"Bearer {new_key()}"}):
        error = refused(lambda h=headers: client.get_model_metadata(MODEL, headers=h))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
    error = refused(lambda: infer(client, None, 1, sequence_start=True))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert client.get_model_metadata(MODEL, headers=bearer("acme")).name == MODEL


def test_a_sequence_id_names_a_sequence_within_its_tenant(
    client: triton.InferenceServerClient,
) -> None:
    started = infer(client, "acme", 77, sequence_start=True)
    session_id = started.get_response().parameters["memserve_session_id"].string_param
    assert step_count(started) == 1
    # globex's 77 is not acme's: never started, and its START leaves acme's alone
    error = refused(lambda: infer(client, "globex", 77))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and NEVER_STARTED in error.message()
    assert step_count(infer(client, "globex", 77, sequence_start=True)) == 1
    assert step_count(infer(client, "acme", 77)) == 2
    # acme's session id is no name for globex: answered as an id nobody made
    theirs = refused(lambda: infer(client, "globex", session_id))
    nobody = refused(lambda: infer(client, "globex", "f" * 32))
    assert theirs.status() == nobody.status() == "StatusCode.INVALID_ARGUMENT"
    assert theirs.message().replace(session_id, "f" * 32) == nobody.message()
    assert step_count(infer(client, "acme", session_id)) == 3  # the owner's v1 id steps it


def test_the_step_rate_quota_holds_and_a_refused_start_makes_nothing(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    def sessions() -> float:
        return metric(scrape(server.metrics_url), "memserve_tenant_sessions", tenant="one_step")

    before = sessions()
    headers = bearer("one_step")
    error = refused(
        lambda: client.infer(MODEL, [steps(2)], sequence_id="big", sequence_start=True,
                             headers=headers)
    )  # fmt: skip
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "never fits" in error.message()
    assert sessions() == before
    assert step_count(infer(client, "one_step", "big", sequence_start=True)) == 1


def test_a_quota_fails_one_message_of_a_stream_and_the_stream_goes_on(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    """Tenant one_call may have one call at a time. With the model's process stopped, a
    step of sequence a holds that call; a step of b, read after it on the same stream, is
    refused (RESOURCE_EXHAUSTED, with a pushback a stream message cannot carry); once the
    model goes on, a's step is answered."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers=bearer("one_call"))  # fmt: skip
    loaded = server.event("model_loaded")
    assert loaded is not None
    try:
        for name in ("a", "b"):  # two sequences: the stream answers concurrently from now on
            client.async_stream_infer(MODEL, [steps()], sequence_id=name, sequence_start=True)
            result, error = results.get(timeout=60)
            assert error is None and step_count(result) == 1
        os.kill(int(loaded["pid"]), signal.SIGSTOP)
        try:
            for name in ("a", "b"):
                client.async_stream_infer(MODEL, [steps()], sequence_id=name, request_id=name)
            _, error = results.get(timeout=60)
            assert error is not None and "RESOURCE_EXHAUSTED" in str(error)
            assert "max_concurrent_calls" in str(error)
        finally:
            os.kill(int(loaded["pid"]), signal.SIGCONT)
        result, error = results.get(timeout=60)
        assert error is None and result.get_response().id == "a" and step_count(result) == 2
    finally:
        client.stop_stream()


def test_no_key_is_ever_logged(server: ServerProcess) -> None:
    assert all(key not in server.log_text() for key in KEYS.values())

"""Tenants, TLS and admission control through a real server: TLS and mutual TLS with
certificates made by openssl, API keys, a tenant never reaching another's sessions, quotas,
bounds that refuse at once and visibly, a burst answered call for call, keys re-read on
SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.child_server import ServerProcess
from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving.export import import_state
from serving.tenants import hash_key, new_key
from serving.wire import encode
from tests.serving.certificates import Pki, make_pki
from tests.serving.client import metric, scrape

STATE_BYTES = 12144  # one ntm-copy session


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def secure_stub(
    server: ServerProcess, pki: Pki, client: tuple[Path, Path] | None = None, ca: Path | None = None
) -> MemServeStub:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    channel = grpc.secure_channel(server.target, credentials, [("grpc.enable_http_proxy", 0)])
    server.channels.append(channel)
    return MemServeStub(channel)  # type: ignore[no-untyped-call]


def refused(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


# ------------------------------------------------------------------------------ TLS


def test_tls_serves_its_certificate_and_refuses_plaintext(tmp_path: Path, pki: Pki) -> None:
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key),
    ) as server:  # fmt: skip
        request = memserve_pb2.ListModelsRequest()
        assert secure_stub(server, pki).ListModels(request, timeout=30).models
        plain = MemServeStub(server.channel())  # type: ignore[no-untyped-call]
        assert refused(plain.ListModels, request, timeout=10).code() == grpc.StatusCode.UNAVAILABLE
        wrong_roots = secure_stub(server, pki, ca=pki.other_client_cert)
        error = refused(wrong_roots.ListModels, request, timeout=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_of_its_ca(tmp_path: Path, pki: Pki) -> None:
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
    ) as server:  # fmt: skip
        request = memserve_pb2.ListModelsRequest()
        good = secure_stub(server, pki, (pki.client_cert, pki.client_key))
        assert good.ListModels(request, timeout=30).models
        for client in (
            None,  # no certificate
            (pki.other_client_cert, pki.other_client_key),  # another CA's
            (pki.expired_client_cert, pki.expired_client_key),  # the CA's, expired
        ):
            stub = secure_stub(server, pki, client)
            assert refused(stub.ListModels, request, timeout=10).code() == (
                grpc.StatusCode.UNAVAILABLE
            ), client


# ------------------------------------------------------------------------------ keys


def keys_file(path: Path, tenants: dict[str, tuple[list[str], str]]) -> Path:
    """A keys file: tenant -> (its keys, extra TOML lines)."""
    lines = []
    for name, (keys, extra) in tenants.items():
        hashes = ", ".join(f'"{hash_key(key)}"' for key in keys)
        lines += [f"[tenants.{name}]", f"keys = [{hashes}]", extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def create(stub: MemServeStub, key: str, model: str = "ntm-copy") -> str:
    request = memserve_pb2.CreateSessionRequest(model=model)
    return str(stub.CreateSession(request, metadata=bearer(key), timeout=30).session_id)


def step(stub: MemServeStub, key: str, session: str, steps: int = 1) -> memserve_pb2.StepResponse:
    inputs = np.random.default_rng().random((steps, 9), dtype=np.float32)
    request = memserve_pb2.StepRequest(session_id=session, inputs=encode(inputs))
    response: memserve_pb2.StepResponse = stub.Step(request, metadata=bearer(key), timeout=60)
    return response


def worker_pid(server: ServerProcess) -> int:
    loaded = server.event("model_loaded")
    assert loaded is not None
    return int(loaded["pid"])


@contextlib.contextmanager
def model_stopped(server: ServerProcess) -> Iterator[None]:
    """The model's process stopped: calls that reach the engine stay in progress."""
    pid = worker_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_calls_need_a_known_key_but_health_and_reflection_do_not(tmp_path: Path) -> None:
    key = new_key()
    path = keys_file(tmp_path / "keys.toml", {"acme": ([key], "")})
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--auth-keys", str(path)) as server:
        stub = server.stub()
        request = memserve_pb2.ListModelsRequest()
        assert stub.ListModels(request, metadata=bearer(key)).models
        missing = refused(stub.ListModels, request)
        unknown = refused(stub.ListModels, request, metadata=bearer(new_key()))
        for error in (missing, unknown):
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "acme" not in (unknown.details() or "")
        health = health_pb2_grpc.HealthStub(server.channel())
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        serving = server.event("serving")
        assert serving is not None and serving["auth"] == "API keys of 1 tenants"
        assert key not in server.log_text() and hash_key(key) not in server.log_text()


def test_a_tenant_never_reaches_another_tenants_session(tmp_path: Path) -> None:
    """Sessions of acme, active, parked on host and parked on disk: every call of globex on
    them answers as for an id that never existed, and nothing of them changes."""
    acme, globex = new_key(), new_key()
    path = keys_file(tmp_path / "keys.toml", {"acme": ([acme], ""), "globex": ([globex], "")})
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--auth-keys", str(path), "--slots", "1",
        "--park-host-bytes", str(STATE_BYTES + 100),
    ) as server:  # fmt: skip
        stub = server.stub()
        sessions = []
        for _ in range(3):  # each new one parks the last: first to host, then to disk
            sessions.append(create(stub, acme))
            step(stub, acme, sessions[-1], 2)
        residences = {
            stub.GetSession(
                memserve_pb2.GetSessionRequest(session_id=s), metadata=bearer(acme)
            ).residence
            for s in sessions
        }
        assert residences == {"active", "parked_host", "parked_disk"}

        def look(session: str) -> tuple[int, dict[str, np.ndarray]]:
            request = memserve_pb2.ExportSessionRequest(session_id=session)
            exported = stub.ExportSession(request, metadata=bearer(acme))
            tensors = import_state(exported.state).tensors
            return exported.step, {name: t.numpy() for name, t in tensors.items()}

        before = [look(s) for s in sessions]
        ghost = uuid.uuid4().hex
        inputs = encode(np.ones((1, 9), np.float32))
        calls = {
            "Step": lambda s: stub.Step(
                memserve_pb2.StepRequest(session_id=s, inputs=inputs), metadata=bearer(globex)
            ),
            "StepStream": lambda s: list(stub.StepStream(
                iter([memserve_pb2.StepRequest(session_id=s, inputs=inputs)]),
                metadata=bearer(globex))),
            "Generate": lambda s: list(stub.Generate(
                memserve_pb2.GenerateRequest(session_id=s, text="hi"), metadata=bearer(globex))),
            "GetSession": lambda s: stub.GetSession(
                memserve_pb2.GetSessionRequest(session_id=s), metadata=bearer(globex)),
            "ForkSession": lambda s: stub.ForkSession(
                memserve_pb2.ForkSessionRequest(session_id=s), metadata=bearer(globex)),
            "ExportSession": lambda s: stub.ExportSession(
                memserve_pb2.ExportSessionRequest(session_id=s), metadata=bearer(globex)),
            "DeleteSession": lambda s: stub.DeleteSession(
                memserve_pb2.DeleteSessionRequest(session_id=s), metadata=bearer(globex)),
        }  # fmt: skip
        for name, call in calls.items():
            never = refused(call, ghost)
            assert never.code() == grpc.StatusCode.NOT_FOUND, name
            for session in sessions:
                error = refused(call, session)
                assert error.code() == grpc.StatusCode.NOT_FOUND, (name, session)
                assert (error.details() or "").replace(session, ghost) == never.details(), name
        after = [look(s) for s in sessions]
        for (step_before, state_before), (step_after, state_after) in zip(
            before, after, strict=True
        ):
            assert step_before == step_after
            assert all(np.array_equal(state_before[k], state_after[k]) for k in state_before)
        # and acme's own calls still work; a deleted session of acme is no oracle either
        stub.DeleteSession(memserve_pb2.DeleteSessionRequest(session_id=sessions[0]),
                           metadata=bearer(acme))  # fmt: skip
        gone = refused(calls["GetSession"], sessions[0])
        assert (gone.details() or "").replace(sessions[0], ghost) == refused(
            calls["GetSession"], ghost).details()  # fmt: skip


def test_tenant_quotas_refuse_naming_the_quota_and_recover(tmp_path: Path) -> None:
    small = new_key()
    path = keys_file(tmp_path / "keys.toml", {"small": ([small], (
        "max_sessions = 2\nsteps_per_second = 50\nmax_concurrent_calls = 1\n"
        f"max_parked_bytes = {2 * STATE_BYTES}\n"))})  # fmt: skip
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--auth-keys", str(path), "--slots", "1",
        "--model-timeout", "600",  # its model process may be stopped on purpose below
    ) as server:  # fmt: skip
        stub = server.stub()
        first, second = create(stub, small), create(stub, small)
        error = refused(create, stub, small)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions" in (error.details() or "")
        stub.DeleteSession(memserve_pb2.DeleteSessionRequest(session_id=second),
                           metadata=bearer(small))  # fmt: skip
        second = create(stub, small)  # room again
        # the step rate: 50 a second, the bucket full at first
        step(stub, small, first, 40)
        error = refused(step, stub, small, first, 40)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "steps_per_second" in (error.details() or "")
        pushback = dict(error.trailing_metadata() or ())["grpc-retry-pushback-ms"]
        assert 0 < int(pushback) <= 1000
        time.sleep(int(pushback) / 1000)  # the bucket refills with time: that is the event
        step(stub, small, first, 40)
        assert "never fits" in (refused(step, stub, small, first, 60).details() or "")
        # The call before last emptied the rate's bucket, which refills a step every 20 ms:
        # with a fast step (the fused CPU step) the held call below met it still empty and
        # was refused for the rate, never held.
        time.sleep(0.1)
        # one call at a time: a call held in the engine, and the next is refused
        with model_stopped(server):
            held = stub.Step.future(
                memserve_pb2.StepRequest(
                    session_id=second, inputs=encode(np.ones((1, 9), np.float32))
                ),
                metadata=bearer(small),
            )
            deadline = time.monotonic() + 60
            while metric(scrape(server.metrics_url), "memserve_tenant_quota_used", tenant="small",
                         quota="max_concurrent_calls") < 1:  # fmt: skip
                assert time.monotonic() < deadline
                time.sleep(0.01)
            error = refused(stub.GetSession, memserve_pb2.GetSessionRequest(session_id=first),
                            metadata=bearer(small))  # fmt: skip
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_calls" in (error.details() or "")
        assert held.result(timeout=60).step == 1


def test_parked_bytes_quota(tmp_path: Path) -> None:
    small = new_key()
    quota = f"max_parked_bytes = {2 * STATE_BYTES}\n"
    path = keys_file(tmp_path / "keys.toml", {"small": ([small], quota)})
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--auth-keys", str(path), "--slots", "1",
        "--model-timeout", "600",  # its model process may be stopped on purpose below
    ) as server:  # fmt: skip
        stub = server.stub()
        for _ in range(3):  # one in the slot, two outside
            create(stub, small)
        error = refused(create, stub, small)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_parked_bytes" in (error.details() or "")


# ------------------------------------------------------------------------------ admission


def test_server_bounds_refuse_at_once_naming_the_bound(tmp_path: Path) -> None:
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--max-sessions", "3", "--slots", "1",
        "--park-host-bytes", "0", "--park-disk-bytes", str(STATE_BYTES),
    ) as server:  # fmt: skip
        stub = server.stub()
        request = memserve_pb2.CreateSessionRequest(model="ntm-copy")
        stub.CreateSession(request)  # in the slot
        stub.CreateSession(request)  # parks the first to disk: the disk is full
        error = refused(stub.CreateSession, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "park_disk_bytes" in (error.details() or "")
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--max-sessions", "3") as server:
        stub = server.stub()
        for _ in range(3):
            stub.CreateSession(request)
        error = refused(stub.CreateSession, request)
        assert "max_sessions" in (error.details() or "")


def test_a_burst_of_ten_times_the_bound_is_answered_call_for_call(tmp_path: Path) -> None:
    """200 Step calls at once on one channel against max_queued_calls = 20, with the model
    stopped so that none finishes meanwhile: 20 are taken, 180 refused at once, none lost
    or cancelled, and the server counts what the client saw."""
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--max-queued-calls", "20",
        "--model-timeout", "600",  # its model process is stopped on purpose below
    ) as server:  # fmt: skip
        stub = server.stub()
        session = stub.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
        before = scrape(server.metrics_url)
        rss_before = resident_bytes(server.pid)

        async def burst() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(
                server.target, options=[("grpc.enable_http_proxy", 0)]
            ) as channel:
                call = channel.unary_unary(
                    "/memserve.v1.MemServe/Step",
                    request_serializer=memserve_pb2.StepRequest.SerializeToString,
                    response_deserializer=memserve_pb2.StepResponse.FromString,
                )
                request = memserve_pb2.StepRequest(
                    session_id=session, inputs=encode(np.ones((1, 9), np.float32))
                )

                async def one() -> grpc.StatusCode:
                    try:
                        await call(request, timeout=120)
                        return grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as error:
                        return error.code()

                tasks = [asyncio.ensure_future(one()) for _ in range(200)]
                await wait_for_metric(server, "memserve_requests_rejected_total", 180, before,
                                      reason="resource_exhausted")  # fmt: skip
                os.kill(worker_pid(server), signal.SIGCONT)
                return list(await asyncio.gather(*tasks))

        os.kill(worker_pid(server), signal.SIGSTOP)
        try:
            codes = Counter(asyncio.run(burst()))
        finally:
            os.kill(worker_pid(server), signal.SIGCONT)
        assert codes == {grpc.StatusCode.OK: 20, grpc.StatusCode.RESOURCE_EXHAUSTED: 180}
        after = scrape(server.metrics_url)
        name = "memserve_request_duration_seconds_count"
        for code, count in codes.items():
            counted = metric(after, name, method="Step", code=code.name)
            assert counted - metric(before, name, method="Step", code=code.name) == count
        assert resident_bytes(server.pid) - rss_before < 64 << 20


def test_a_burst_of_calls_on_one_channel_is_never_cancelled(tmp_path: Path) -> None:
    """gRPC's default cancels calls received past 1000 not yet taken; memserve takes them."""
    with ServerProcess(tmp_path, "--models", "ntm-copy") as server:

        async def burst() -> Counter[str]:
            async with grpc.aio.insecure_channel(
                server.target, options=[("grpc.enable_http_proxy", 0)]
            ) as channel:
                call = channel.unary_unary(
                    "/memserve.v1.MemServe/ListModels",
                    request_serializer=memserve_pb2.ListModelsRequest.SerializeToString,
                    response_deserializer=memserve_pb2.ListModelsResponse.FromString,
                )

                async def one() -> str:
                    try:
                        await call(memserve_pb2.ListModelsRequest(), timeout=120)
                        return "OK"
                    except grpc.aio.AioRpcError as error:
                        return str(error.code().name)

                return Counter(await asyncio.gather(*[one() for _ in range(3000)]))

        assert asyncio.run(burst()) == {"OK": 3000}


async def wait_for_metric(
    server: ServerProcess, name: str, delta: float, before: dict[Any, float], **labels: str
) -> None:
    deadline = time.monotonic() + 60
    while (
        metric(scrape(server.metrics_url), name, **labels) - metric(before, name, **labels) < delta
    ):
        assert time.monotonic() < deadline, f"{name} never rose by {delta}"
        await asyncio.sleep(0.01)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------ SIGHUP


def test_sighup_rereads_the_keys_while_sessions_live(tmp_path: Path) -> None:
    old, new, other = new_key(), new_key(), new_key()
    path = keys_file(tmp_path / "keys.toml", {"acme": ([old], "")})
    with ServerProcess(tmp_path, "--models", "ntm-copy", "--auth-keys", str(path)) as server:
        stub = server.stub()
        session = create(stub, old)
        step(stub, old, session, 3)
        keys_file(path, {"acme": ([new], ""), "globex": ([other], "")})
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while server.event("keys_reloaded") is None:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.01)
        assert refused(step, stub, old, session).code() == grpc.StatusCode.UNAUTHENTICATED
        assert step(stub, new, session).step == 4  # acme's session, reached by its new key
        create(stub, other)
        path.write_text("not toml [")
        server.signal(signal.SIGHUP)  # a broken file keeps the keys as they were
        while server.event("keys_reload_failed") is None:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.01)
        assert step(stub, new, session).step == 5


# ------------------------------------------------------------------------------ keys file


def test_keys_new_prints_a_key_and_the_line_that_admits_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from serving.errors import Unauthenticated
    from serving.tenants import Keys

    printed = subprocess.run(
        [sys.executable, "-m", "memserve", "keys", "new"], capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    key = printed[0].removeprefix("key:").strip()
    line = printed[1].removeprefix("line:").strip()
    path = tmp_path / "keys.toml"
    path.write_text(f"[tenants.acme]\nkeys = [{line}]\nsteps_per_second = 10.5\n")
    keys = Keys.load(path)
    assert keys.authenticate(f"Bearer {key}").name == "acme"
    assert keys.authenticate(f"Bearer {key}").steps_per_second == 10.5
    with pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {key}x")
    with pytest.raises(Unauthenticated):
        keys.authenticate(key)  # not a bearer token


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[tenants.acme]\nkeys = ["secret"]\n', "never keys themselves"),
        ("[tenants.acme]\nkeys = []\n", "at least one"),
        ('[tenants.acme]\nkeys = ["sha256:' + "0" * 64 + '"]\nmax_sessions = 0\n', "> 0"),
        ('[tenants.acme]\nkeys = ["sha256:' + "0" * 64 + '"]\nmax_sessions = 1.5\n', "whole"),
        ('[tenants.acme]\nkeys = ["sha256:' + "0" * 64 + '"]\nquota = 1\n', "unknown fields"),
        (
            '[tenants.a]\nkeys = ["sha256:'
            + "0" * 64
            + '"]\n[tenants.b]\nkeys = ["sha256:'
            + "0" * 64
            + '"]\n',
            "also one of",
        ),
        ("not toml [", "not valid TOML"),
        ("[other]\n", "[tenants.NAME]"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, text: str, words: str
) -> None:
    from serving.tenants import Keys

    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as error:
        Keys.load(path)
    assert str(path) in str(error.value)

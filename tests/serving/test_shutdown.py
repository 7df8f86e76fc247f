"""SIGTERM and SIGINT drain the server: health turns NOT_SERVING, new calls get
UNAVAILABLE, the call in flight finishes, the process exits 0; plus health and reflection
as a client without the .proto sees them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from bench.child_server import ServerProcess
from clients.loadgen.server_metrics import buckets
from protos import memserve_pb2, memserve_pb2_grpc
from tests.serving.client import create, info, metric, scrape, step, wait_for_launches

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def call_in_background(
    stub: memserve_pb2_grpc.MemServeStub, session_id: str, steps: int
) -> tuple[threading.Thread, list[grpc.RpcError]]:
    """A Step call of `steps` steps in a thread of its own (started), and the errors it
    ends with."""
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            step(stub, session_id, np.zeros((steps, 9), np.float32))
        except grpc.RpcError as error:
            errors.append(error)

    caller = threading.Thread(target=run)
    caller.start()
    return caller, errors


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_work_and_exits_zero(tmp_path: Path, number: int) -> None:
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--max-steps-per-call", "4000", "--grace", "60"
    ) as server:
        channel = server.channel()
        health = health_pb2_grpc.HealthStub(channel)
        stub = server.stub()
        request = health_pb2.HealthCheckRequest(service="memserve.v1.MemServe")
        assert health.Check(request).status == SERVING
        watch = health.Watch(request)
        assert next(watch).status == SERVING

        session_id = create(stub)
        long_call: dict[str, tuple[np.ndarray, int]] = {}
        failures: list[grpc.RpcError] = []

        def run_long_call() -> None:  # 1500 steps: seconds of work in flight
            try:
                long_call["result"] = step(stub, session_id, np.zeros((1500, 9), np.float32))
            except grpc.RpcError as error:
                failures.append(error)

        caller = threading.Thread(target=run_long_call)
        caller.start()
        wait_for_launches(server.metrics_url, at_least=10)
        assert caller.is_alive()  # stepping, with most of its 1500 steps to go
        server.signal(number)
        assert next(watch).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            create(stub)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        caller.join(60)
        assert not failures, failures
        outputs, count = long_call["result"]
        assert count == 1500 and outputs.shape == (1500, 8)
        assert server.wait(30) == 0
        stopped = server.event("stopped")
        assert stopped is not None and stopped["calls_cut_short"] == 0


def test_grace_period_bounds_the_drain(tmp_path: Path) -> None:
    """A call longer than the grace period is cut short; the server still exits 0."""
    with ServerProcess(
        tmp_path, "--models", "ntm-copy", "--max-steps-per-call", "100000", "--grace", "0.5"
    ) as server:
        stub = server.stub()
        session_id = create(stub)
        caller, errors = call_in_background(stub, session_id, 100000)
        wait_for_launches(server.metrics_url, at_least=10)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert time.monotonic() - started < 10
        caller.join(30)
        assert errors and errors[0].code() == grpc.StatusCode.CANCELLED, errors
        stopped = server.event("stopped")
        assert stopped is not None and stopped["calls_cut_short"] == 1


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    channel = server.channel()
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"memserve.v1.MemServe", "grpc.health.v1.Health"} <= services
    step_method = database.FindFileContainingSymbol("memserve.v1.MemServe")
    assert step_method.name == "protos/memserve.proto"


def test_health_check_names_unknown_services(server: ServerProcess) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.stub().ListModels(memserve_pb2.ListModelsRequest()).models


@pytest.mark.parametrize("store", ["memory", "dir"])
def test_a_dead_model_process_fails_its_calls_and_the_server_exits_one(
    tmp_path: Path, store: str
) -> None:
    """The model runs in a child process (serving/worker.py). If that process dies, the
    call in flight is answered UNAVAILABLE (not left hanging), health goes NOT_SERVING, and
    the server exits 1 so that a supervisor starts a fresh one. Without a session store the
    session was lost with the process; with one, the next server has it at its last
    committed step, nothing of the failed call in it."""
    import os

    durable = ["--store", f"dir:{tmp_path / 'store'}"] if store == "dir" else []
    flags = ["--models", "ntm-copy", "--max-steps-per-call", "100000", "--grace", "5", *durable]
    with ServerProcess(tmp_path, *flags) as server:
        stub = server.stub()
        session_id = create(stub)
        step(stub, session_id, np.ones((3, 9), np.float32))
        loaded = server.event("model_loaded")
        assert loaded is not None and server.process is not None
        assert loaded["pid"] != server.process.pid
        caller, errors = call_in_background(stub, session_id, 50000)
        wait_for_launches(server.metrics_url, at_least=10)
        assert caller.is_alive()
        os.kill(loaded["pid"], signal.SIGKILL)
        caller.join(30)
        assert not caller.is_alive()
        assert len(errors) == 1
        assert errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors[0].details()
        kept = "keeps it at its last committed step" if durable else "was lost"
        assert kept in errors[0].details()
        assert server.wait(30) == 1
        exited = server.event("model_process_exited")
        assert exited is not None and "exit code -9" in exited["message"], exited
    if durable:
        with ServerProcess(tmp_path, *flags) as again:
            assert info(again.stub(), session_id).step == 3


@pytest.mark.parametrize("when", ["serving", "draining", "exporting"])
def test_a_model_process_that_stops_answering_is_killed_and_the_server_exits_one(
    tmp_path: Path, when: str
) -> None:
    """A model process that is alive but answers nothing (SIGSTOP stands in for a hung
    device) while the server serves, drains, or waits for a slot read (an export, which
    holds the engine's lock): the request it holds is waited for only `--model-timeout`
    seconds, then the process is killed, the call is answered UNAVAILABLE and the server
    exits 1 (for its supervisor to start another)."""
    import os

    timeout = 5.0  # requests here take milliseconds: only the stopped process exceeds it
    flags = ["--models", "ntm-copy", "--max-steps-per-call", "100000", "--grace", "0.5",
             "--model-timeout", str(timeout)]  # fmt: skip
    with ServerProcess(tmp_path, *flags) as server:
        stub = server.stub()
        session_id = create(stub)
        loaded = server.event("model_loaded")
        assert loaded is not None
        errors: list[grpc.RpcError] = []
        if when == "exporting":
            os.kill(loaded["pid"], signal.SIGSTOP)
            caller = threading.Thread(target=export_in_background, args=(stub, session_id, errors))
            caller.start()
        else:
            caller, errors = call_in_background(stub, session_id, 50000)
            wait_for_launches(server.metrics_url, at_least=10)
            os.kill(loaded["pid"], signal.SIGSTOP)
        try:
            if when == "draining":
                server.signal(signal.SIGTERM)
            assert server.wait(timeout + 30) == 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(loaded["pid"], signal.SIGCONT)
        caller.join(30)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        stuck = server.event("model_process_stuck")
        assert stuck is not None and f"more than {timeout:g} s" in stuck["message"], stuck
        # It names the request, so that a slow model is told apart from a stuck one.
        if when == "exporting":
            assert stuck["request"] == "a slot operation (ReadSlot)", stuck
        else:  # the one call, 8 steps a launch (--steps-per-launch's default)
            assert stuck["request"].startswith("a launch of 1 row, up to 8 steps each"), stuck
        stopped = server.event("stopped")
        assert stopped is not None and stopped["exit_code"] == 1


def export_in_background(
    stub: memserve_pb2_grpc.MemServeStub, session_id: str, errors: list[grpc.RpcError]
) -> None:
    try:
        stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
    except grpc.RpcError as error:
        errors.append(error)


def wait_for_restores(url: str, at_least: float, seconds: float = 60.0) -> None:
    """Return once the server has put `at_least` parked sessions into launches (counted as
    each launch is assembled, just before it is sent; the metrics page has a thread of its
    own, so it answers even while the event loop is held)."""
    deadline = time.monotonic() + seconds
    while metric(scrape(url), "memserve_session_restores_total") < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} restores in {seconds} s"
        time.sleep(0.02)


def test_large_requests_to_a_busy_model_process_never_block_the_server(tmp_path: Path) -> None:
    """The model process reads its next request only once it has answered the last. A launch
    that brings 64 parked sessions back (64 states, far more than the socket's buffer) sent
    while it does not read (stopped) waits in the server's buffer: health checks and other
    calls are still answered meanwhile, and once the process goes on every call is answered
    as if nothing had happened."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    sessions, slots = 128, 64
    # A second's wait before each launch gathers the 64 calls into one (its restores:
    # 64 x 12 KB against the socket's ~200 KB).
    flags = ["--models", "ntm-copy", "--slots", str(slots), "--model-timeout", "600",
             "--max-queue-delay", "1"]  # fmt: skip
    with ServerProcess(tmp_path, *flags) as server, ThreadPoolExecutor(sessions) as pool:
        stub = server.stub()
        ids = [create(stub) for _ in range(sessions)]
        inputs = np.random.default_rng(0).standard_normal((sessions, 1, 9)).astype(np.float32)
        list(pool.map(lambda i: step(stub, ids[i], inputs[i]), range(slots)))
        list(pool.map(lambda i: step(stub, ids[i], inputs[i]), range(slots, sessions)))
        loaded = server.event("model_loaded")
        assert loaded is not None
        restored = metric(scrape(server.metrics_url), "memserve_session_restores_total")
        os.kill(loaded["pid"], signal.SIGSTOP)
        try:
            calls = [pool.submit(step, stub, ids[i], inputs[i]) for i in range(slots)]
            # 390 KB sent, or being sent
            wait_for_restores(server.metrics_url, at_least=restored + 32)
            health = health_pb2_grpc.HealthStub(server.channel())
            for _ in range(3):  # the event loop is free: it answers while the calls wait
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert reply.status == SERVING
            assert info(stub, ids[-1]).step == 1
            assert not any(call.done() for call in calls)  # the stopped process answered nothing
        finally:
            os.kill(loaded["pid"], signal.SIGCONT)
        results = {i: call.result(60) for i, call in enumerate(calls)}
        by_size = buckets(scrape(server.metrics_url), "memserve_batch_size")
        assert by_size["16.0"] < by_size["+Inf"]  # a launch of more than 16 restored states
        (tmp_path / "reference").mkdir()
        with ServerProcess(tmp_path / "reference", "--models", "ntm-copy") as reference:
            again = reference.stub()
            for index in range(slots):  # each session's second step, on a server at ease
                session_id = create(again)
                step(again, session_id, inputs[index])
                outputs, count = step(again, session_id, inputs[index])
                assert count == results[index][1] == 2
                assert np.array_equal(outputs, results[index][0]), index


def test_a_drain_that_cannot_write_a_session_says_so_and_exits_one(tmp_path: Path) -> None:
    """The drain writes every session with steps since its last snapshot. One it cannot
    (its state, parked to disk, is gone) is logged, the others are written, and the server
    exits 1 rather than claim it wrote everything (with `--durability park` those writes
    are all a session has; with `launch`, here, its calls are in the store and the next
    server replays them)."""
    park = tmp_path / "park"
    flags = [
        "--models", "ntm-copy", "--slots", "1", "--park-host-bytes", "0",
        "--park-dir", str(park), "--store", f"dir:{tmp_path / 'store'}",
    ]  # fmt: skip
    with ServerProcess(tmp_path, *flags) as server:
        stub = server.stub()
        first, second = create(stub), create(stub)
        step(stub, first, np.ones((2, 9), np.float32))  # parks second to disk
        step(stub, second, np.ones((2, 9), np.float32))  # parks first to disk
        files = list(park.iterdir())
        assert len(files) == 1
        files[0].unlink()  # first's parked state
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 1
        failed = server.event("checkpoint_failed")
        assert failed is not None and failed["session"] == first
        stopped = server.event("stopped")
        assert stopped is not None
        assert (stopped["sessions_committed"], stopped["sessions_not_written"]) == (1, 1)
    with ServerProcess(tmp_path, *flags) as again:
        assert [info(again.stub(), s).step for s in (first, second)] == [2, 2]


def test_the_healthcheck_command_exits_zero_only_while_serving(tmp_path: Path) -> None:
    """`memserve healthcheck`, a container's probe, against a real server."""

    def probe(server: ServerProcess, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "memserve", "healthcheck", "--target", server.target]
        return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=60)

    with ServerProcess(tmp_path, "--models", "ntm-copy") as server:
        serving = probe(server)
        assert serving.returncode == 0 and "SERVING" in serving.stdout
        unknown = probe(server, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    gone = probe(server, "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr

"""Replicas sharing one real redis-server (`--replica NAME --store redis://...`), spoken to
directly (tests/cluster tests them behind Envoy): any replica serves any session, reads are
never stale, and a frozen replica's stale commit is refused with nothing doubled. Each is
checked against a lone memory-store server given the same calls."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.child_server import ServerProcess
from bench.redis_server import RedisServer
from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving.durable.redis_store import RedisSessionStore
from serving.export import import_state
from serving.wire import decode, encode
from tests.serving.client import metric, scrape


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess]]:
    """Replicas a and b on one Redis, and a lone reference server."""
    with RedisServer(tmp_path / "redis") as redis_server:
        # a's model process is stopped on purpose: its watchdog must not end it first
        common = ("--models", "ntm-copy", "--store", redis_server.url, "--model-timeout", "600")
        with (
            ServerProcess(tmp_path, *common, "--replica", "a") as a,
            ServerProcess(tmp_path, *common, "--replica", "b") as b,
            ServerProcess(tmp_path, "--models", "ntm-copy") as reference,
        ):
            yield a, b, reference


def step(
    stub: MemServeStub, session: str, inputs: np.ndarray, request_id: str = "", **kw: float
) -> memserve_pb2.StepResponse:
    request = memserve_pb2.StepRequest(
        session_id=session, inputs=encode(inputs), request_id=request_id
    )
    response: memserve_pb2.StepResponse = stub.Step(request, **kw)
    return response


def state(stub: MemServeStub, session: str) -> tuple[int, dict[str, np.ndarray]]:
    exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session))
    tensors = import_state(exported.state).tensors
    return exported.step, {name: t.numpy() for name, t in tensors.items()}


def same(a: tuple[int, dict[str, np.ndarray]], b: tuple[int, dict[str, np.ndarray]]) -> bool:
    return a[0] == b[0] and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


def test_any_replica_serves_any_session_and_reads_are_never_stale(
    cluster: tuple[ServerProcess, ServerProcess, ServerProcess],
) -> None:
    a, b, reference = cluster
    stubs, ref = [a.stub(), b.stub()], reference.stub()
    rng = np.random.default_rng()
    pairs = []
    for i in range(4):
        request = memserve_pb2.CreateSessionRequest(model="ntm-copy")
        made = stubs[i % 2].CreateSession(request)
        assert made.residence == "stored"  # handed to the store by the replica that made it
        pairs.append((made.session_id, ref.CreateSession(request).session_id))
    for round_ in range(6):
        for i, (mine, theirs) in enumerate(pairs):
            stub = stubs[(round_ + i) % 2]  # the sessions move from replica to replica
            inputs = rng.random((int(rng.integers(1, 5)), 9), dtype=np.float32)
            here, there = step(stub, mine, inputs, uuid.uuid4().hex), step(ref, theirs, inputs)
            assert here.step == there.step
            assert np.array_equal(decode(here.outputs, "o"), decode(there.outputs, "o"))
            for reader in stubs:  # whichever replica is asked, it answers as the store has it
                assert same(state(reader, mine), state(ref, theirs))
                info = reader.GetSession(memserve_pb2.GetSessionRequest(session_id=mine))
                assert info.step == there.step
    # a session deleted on one replica is gone on the other too
    stubs[0].DeleteSession(memserve_pb2.DeleteSessionRequest(session_id=pairs[0][0]))
    with pytest.raises(grpc.RpcError) as gone:
        stubs[1].GetSession(memserve_pb2.GetSessionRequest(session_id=pairs[0][0]))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    samples = scrape(b.metrics_url)
    assert metric(samples, "memserve_sessions", replica="b", state="active") >= 0
    assert metric(samples, "memserve_build_info", replica="b") == 1


def test_a_frozen_replica_loses_its_session_and_nothing_is_doubled(
    cluster: tuple[ServerProcess, ServerProcess, ServerProcess],
) -> None:
    """Replica a is frozen with a call of the session in progress; the client retries the
    call on b, which takes the session over; a, thawed, finishes the call but its commit is
    refused, and it drops its copy. The session took the call once."""
    a, b, reference = cluster
    stub_a, stub_b, ref = a.stub(), b.stub(), reference.stub()
    rng = np.random.default_rng()
    session = stub_a.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    twin = ref.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    first = rng.random((3, 9), dtype=np.float32)
    step(stub_a, session, first, uuid.uuid4().hex)
    step(ref, twin, first)
    worker = int(a.event("model_loaded")["pid"])  # type: ignore[index]
    inputs, request_id = rng.random((4, 9), dtype=np.float32), uuid.uuid4().hex
    os.kill(worker, signal.SIGSTOP)  # the call cannot finish on a
    try:
        held = stub_a.Step.future(
            memserve_pb2.StepRequest(
                session_id=session, inputs=encode(inputs), request_id=request_id
            )
        )
        deadline = time.monotonic() + 60
        while metric(scrape(a.metrics_url), "memserve_queue_length", replica="a") < 1:
            assert time.monotonic() < deadline, "the call never reached a's engine"
            time.sleep(0.01)
        a.signal(signal.SIGSTOP)  # and a is frozen, as in a long pause
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        taken = step(stub_b, session, inputs, request_id)  # the client's retry, on b
    finally:
        a.signal(signal.SIGCONT)
    expected = step(ref, twin, inputs)
    assert taken.step == expected.step == 7
    assert np.array_equal(decode(taken.outputs, "o"), decode(expected.outputs, "o"))
    with pytest.raises(grpc.RpcError) as stale:  # a's commit is refused: it answers so
        held.result(timeout=60)
    assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
    for stub in (stub_a, stub_b):  # and both answer as the store has it: once
        assert same(state(stub, session), state(ref, twin))
    again = step(stub_a, session, inputs, request_id)  # a repeat anywhere: the first answer
    assert again == taken


def test_a_session_under_steady_load_is_written_in_whole_as_it_goes(tmp_path: Path) -> None:
    """A session called back to back is rarely between calls when the expiry sweep looks;
    its snapshot must still follow its steps (written once the commit of the call that
    crossed `--snapshot-every` is taken), or a replica that takes it over replays
    everything since it was last idle, milliseconds a step."""
    every, rows = 16, 5
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        ServerProcess(tmp_path, "--models", "ntm-copy", "--store", redis_server.url,
                      "--replica", "a", "--snapshot-every", str(every)) as a,
    ):  # fmt: skip
        store = RedisSessionStore(redis_server.url)
        stub, rng = a.stub(), np.random.default_rng(3)
        session = stub.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy"))
        lags = []
        for _ in range(40):
            inputs = rng.random((rows, 9), dtype=np.float32)
            answered = step(stub, session.session_id, inputs, uuid.uuid4().hex).step
            stored = store.load(session.session_id)
            assert stored.step == answered
            lags.append(answered - (stored.snapshot.step if stored.snapshot else 0))
        # after a call, the store holds a snapshot at most `every` steps and a call or two old
        assert max(lags) <= every + 2 * rows, lags
        assert stored.snapshot is not None and stored.snapshot.step > 150

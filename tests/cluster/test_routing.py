"""Through Envoy: each session's calls go to the replica its id hashes to (Envoy's Maglev
table, as `memserve.cluster.maglev` computes it, seen in the replicas' metrics), the answers
equal a lone server's bit for bit, a client without the session header is served the same
(only slower), and bad requests get the same status codes and messages as a replica gives
directly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from bench.child_cluster import Cluster, session_metadata
from bench.child_server import ServerProcess
from clients.aio import AsyncClient
from clients.client import Client
from protos import memserve_pb2
from serving.export import import_state
from serving.wire import decode, encode
from tests.cluster.conftest import CHAT
from tests.serving.client import metric, scrape
from tests.serving.oracle import LIMIT
from tests.serving.test_bad_input import SESSION_CASES, STEP_CASES

STEPS = "memserve_request_duration_seconds_count"


def step_counts(cluster: Cluster) -> dict[str, float]:
    return {
        name: metric(scrape(cluster.metrics_url(name)), STEPS, method="Step")
        for name in cluster.replica_names(cluster.state())
    }


def served_by(cluster: Cluster, before: dict[str, float]) -> str:
    """The replica whose count of answered Steps grew by one (the count is observed just
    after the answer is sent, so wait for it)."""
    deadline = time.monotonic() + 30
    while True:
        grown = {n: c - before[n] for n, c in step_counts(cluster).items() if c > before[n]}
        if sum(grown.values()) >= 1:
            assert len(grown) == 1 and sum(grown.values()) == 1, grown
            return next(iter(grown))
        assert time.monotonic() < deadline, "no replica counted the Step"
        time.sleep(0.01)


def exported(stub: object, session: str, **kw: object) -> dict[str, np.ndarray]:
    reply = stub.ExportSession(  # type: ignore[attr-defined]
        memserve_pb2.ExportSessionRequest(session_id=session), **kw
    )
    return {name: t.numpy() for name, t in import_state(reply.state).tensors.items()}


def test_sessions_go_where_their_ids_hash_and_answer_as_one_server(
    healthy: Cluster, reference: ServerProcess
) -> None:
    envoy, ref, rng = healthy.stub(), reference.stub(), np.random.default_rng()
    table = healthy.table()
    create = memserve_pb2.CreateSessionRequest(model="ntm-copy")
    pairs = [(envoy.CreateSession(create).session_id, ref.CreateSession(create).session_id)
             for _ in range(9)]  # fmt: skip
    places = set()
    for _ in range(2):
        for mine, theirs in pairs:
            inputs = rng.random((int(rng.integers(1, 9)), 9), dtype=np.float32)
            before = step_counts(healthy)
            here = envoy.Step(
                memserve_pb2.StepRequest(session_id=mine, inputs=encode(inputs)),
                metadata=session_metadata(mine),
            )
            there = ref.Step(memserve_pb2.StepRequest(session_id=theirs, inputs=encode(inputs)))
            assert served_by(healthy, before) == table.replica_of(mine)
            places.add(table.replica_of(mine))
            assert here.step == there.step
            assert np.array_equal(decode(here.outputs, "o"), decode(there.outputs, "o"))
    assert len(places) >= 2  # nine sessions on one replica of three: 1 run in 4000
    # a raw client, without the header, lands anywhere and is served the same
    for mine, theirs in pairs[:3]:
        inputs = rng.random((3, 9), dtype=np.float32)
        here = envoy.Step(memserve_pb2.StepRequest(session_id=mine, inputs=encode(inputs)))
        there = ref.Step(memserve_pb2.StepRequest(session_id=theirs, inputs=encode(inputs)))
        assert here.step == there.step
        assert np.array_equal(decode(here.outputs, "o"), decode(there.outputs, "o"))
        mine_state = exported(envoy, mine, metadata=session_metadata(mine))
        theirs_state = exported(ref, theirs)
        assert all(np.array_equal(mine_state[k], theirs_state[k]) for k in theirs_state)
    # a conversation streams through Envoy as from one server
    chat = memserve_pb2.CreateSessionRequest(model=CHAT, seed=5)
    mine, theirs = envoy.CreateSession(chat).session_id, ref.CreateSession(chat).session_id
    for turn in range(2):
        request = memserve_pb2.GenerateRequest(text=f"hello {turn} , how are you ?",
                                               seed=turn, max_tokens=LIMIT)  # fmt: skip
        request.session_id = mine
        here_reply = list(envoy.Generate(request, metadata=session_metadata(mine)))
        request.session_id = theirs
        assert here_reply == list(ref.Generate(request))


def test_bad_input_gets_the_same_status_through_envoy_as_directly(healthy: Cluster) -> None:
    envoy, direct = healthy.stub(), healthy.stub("r1")
    session = envoy.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    good = np.full((2, 9), 0.5, np.float32)
    envoy.Step(memserve_pb2.StepRequest(session_id=session, inputs=encode(good)),
               metadata=session_metadata(session))  # fmt: skip

    def outcome(call: Callable[..., object], *args: object, **kw: object) -> tuple[object, str]:
        with pytest.raises(grpc.RpcError) as refused:
            call(*args, **kw)
        return refused.value.code(), refused.value.details() or ""

    for case, inputs, code, _ in STEP_CASES:
        request = memserve_pb2.StepRequest(session_id=session)
        if inputs is not None:
            request.inputs.CopyFrom(inputs)
        via_envoy = outcome(envoy.Step, request, metadata=session_metadata(session))
        straight = outcome(direct.Step, request)
        assert via_envoy == straight, case
        assert via_envoy[0] == code, case
    for case, call, code, _ in SESSION_CASES:
        via_envoy, straight = outcome(call, envoy, session), outcome(call, direct, session)
        assert via_envoy == straight, case
        assert via_envoy[0] == code, case
    info = envoy.GetSession(memserve_pb2.GetSessionRequest(session_id=session),
                            metadata=session_metadata(session))  # fmt: skip
    assert info.step == 2  # nothing refused changed it


def test_status_reports_every_process(healthy: Cluster) -> None:
    result = healthy.command_line("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("redis", "r1", "r2", "r3", "envoy"):
        assert f" {name} " in result.stdout
    assert result.stdout.count("serving") == 5


def test_memserves_clients_send_the_session_header(healthy: Cluster) -> None:
    """The client library's calls (blocking and asyncio faces) reach the replica the
    session's id hashes to: they carry the header themselves (a step stream too, checked
    here only to be served)."""
    table, target = healthy.table(), f"127.0.0.1:{healthy.state()['port']}"
    inputs = np.full((2, 9), 0.5, np.float32)
    with Client(target, options=[("grpc.enable_http_proxy", 0)]) as client:
        for _ in range(4):
            session = client.create_session("ntm-copy").session_id
            before = step_counts(healthy)
            client.step(session, inputs)
            assert served_by(healthy, before) == table.replica_of(session)
            with client.step_stream(session) as stream:
                stream.step(inputs)
            assert client.get_session(session).step == 4

    async def asynchronously() -> list[str]:
        async with AsyncClient(target, options=[("grpc.enable_http_proxy", 0)]) as client:
            session = (await client.create_session("ntm-copy")).session_id
            before = step_counts(healthy)
            await client.step(session, inputs)
            return [session, served_by(healthy, before)]

    session, replica = asyncio.run(asynchronously())
    assert replica == table.replica_of(session)

"""Durable sessions through real processes: a server on a session store (`dir:` or a real
redis-server) is killed with SIGKILL and started again, and every acknowledged step is
there, none doubled, every output bit-identical to a server that never stopped (the
reference: the same calls on a memory-store server). Request ids, an undone turn, a damaged
store, other weights and a Redis outage, each against what docs/serving.md promises."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.child_server import ServerProcess
from bench.redis_server import RedisServer
from models import checkpoint
from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from serving.wire import decode
from tests.serving import oracle
from tests.serving.oracle import LIMIT, generate, replay, same_state, step
from tests.tiny_vmed import tiny_vmed as make_tiny_vmed

CHAT = "vmed-tiny"
ARGS = ("--max-new-tokens", str(LIMIT), "--max-steps-per-call", "64", "--slots", "8")
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory, _ = make_tiny_vmed(tmp_path_factory.mktemp("model") / CHAT)
    return directory


@contextlib.contextmanager
def store(kind: str, directory: Path) -> Iterator[tuple[str, RedisServer | None]]:
    """A store URL of `kind`, with its redis-server when it has one."""
    if kind == "dir":
        yield f"dir:{directory / 'store'}", None
        return
    with RedisServer(directory / "redis") as redis_server:
        yield redis_server.url, redis_server


class Node:
    """The durable server under test: started on a store, killed with SIGKILL, started again
    (on any free port; `generation` counts the starts)."""

    def __init__(self, directory: Path, url: str, chat: Path, *extra: str) -> None:
        self.directory = directory
        self.args = ("--store", url, "--models", f"ntm-copy,{chat}", *ARGS, *extra)
        self.server: ServerProcess | None = None
        self.generation = 0
        self.changed = threading.Condition()  # a new start, or a call acknowledged
        self._stub: MemServeStub | None = None

    def start(self) -> Node:
        server = ServerProcess(self.directory, *self.args)
        server.start()
        with self.changed:
            self.server, self.generation = server, self.generation + 1
            self._stub = server.stub()
            self.changed.notify_all()
        return self

    @property
    def running(self) -> ServerProcess:
        assert self.server is not None, "not started"
        return self.server

    def stub(self) -> MemServeStub:
        """The stub of the server now running (one channel per start)."""
        assert self._stub is not None
        return self._stub

    def kill(self) -> None:
        """SIGKILL: nothing is drained, nothing flushed."""
        assert self.server is not None
        self.server.signal(signal.SIGKILL)
        self.server.wait()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def new_id() -> str:
    return uuid.uuid4().hex


def state_of(stub: MemServeStub, session: str) -> dict[str, np.ndarray]:
    return oracle.state_of(stub, session)[1]


# ---------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("kind", ["dir", "redis"])
def test_after_kill_9_every_session_is_back_bit_for_bit(
    kind: str, tmp_path: Path, chat_model: Path
) -> None:
    rng = np.random.default_rng()
    with (
        store(kind, tmp_path) as (url, _),
        ServerProcess(tmp_path, "--models", f"ntm-copy,{chat_model}", *ARGS) as reference,
    ):
        node = Node(tmp_path, url, chat_model).start()
        try:
            ref, served = reference.stub(), node.stub()
            pairs = []  # (model, id here, id on the reference)
            for model in ("ntm-copy", "ntm-copy", "ntm-copy", CHAT):
                request = memserve_pb2.CreateSessionRequest(model=model, seed=3)
                pairs.append(
                    (model, served.CreateSession(request).session_id,
                     ref.CreateSession(request).session_id)
                )  # fmt: skip

            def run_calls(stub_a: MemServeStub, stub_b: MemServeStub, turn: int) -> None:
                for model, mine, theirs in pairs:
                    if model == CHAT:
                        text = f"hello number {turn} , how are you ?"
                        assert generate(stub_a, mine, text, 10 + turn, new_id()) == generate(
                            stub_b, theirs, text, 10 + turn
                        )
                    else:
                        inputs = rng.random((int(rng.integers(1, 9)), 9), dtype=np.float32)
                        a, b = step(stub_a, mine, inputs, new_id()), step(stub_b, theirs, inputs)
                        assert a.step == b.step
                        assert np.array_equal(decode(a.outputs, "a"), decode(b.outputs, "b"))

            run_calls(served, ref, 0)
            run_calls(served, ref, 1)
            node.kill()
            node.start()
            served = node.stub()
            for _, mine, theirs in pairs:
                here = served.GetSession(memserve_pb2.GetSessionRequest(session_id=mine))
                there = ref.GetSession(memserve_pb2.GetSessionRequest(session_id=theirs))
                assert here.residence == "stored" and here.step == there.step
            run_calls(served, ref, 2)
            for _, mine, theirs in pairs:
                assert same_state(state_of(served, mine), state_of(ref, theirs))
            loaded = [e for e in node.running.events() if e.get("event") == "session_loaded"]
            assert len(loaded) == len(pairs)
        finally:
            node.stop()


# ---------------------------------------------------------------------------- request ids


def test_a_repeated_request_id_gets_the_first_answer_and_runs_nothing(
    tmp_path: Path, chat_model: Path
) -> None:
    node = Node(tmp_path, f"dir:{tmp_path / 'store'}", chat_model).start()
    try:
        stub = node.stub()
        made_id = new_id()
        create = memserve_pb2.CreateSessionRequest(model="ntm-copy", request_id=made_id)
        session = stub.CreateSession(create).session_id
        assert stub.CreateSession(create).session_id == session  # the same session again
        with pytest.raises(grpc.RpcError) as other:
            stub.CreateSession(
                memserve_pb2.CreateSessionRequest(
                    model="ntm-copy", ttl_seconds=5, request_id=made_id
                )
            )
        assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rng = np.random.default_rng()
        inputs = rng.random((3, 9), dtype=np.float32)
        first_id = new_id()
        first = step(stub, session, inputs, first_id)
        again = step(stub, session, inputs, first_id)
        assert again == first and first.step == 3
        with pytest.raises(grpc.RpcError) as changed:
            step(stub, session, inputs + 1, first_id)
        assert changed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different request" in (changed.value.details() or "")
        # two calls with one id at once: one runs, both get its answer
        long_inputs = rng.random((60, 9), dtype=np.float32)
        twin_id = new_id()
        results: list[Any] = []

        def twin() -> None:
            results.append(step(stub, session, long_inputs, twin_id))

        with node.running.held():  # both are received before either can run
            threads = [threading.Thread(target=twin) for _ in range(2)]
            for thread in threads:
                thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2 and results[0] == results[1] and results[0].step == 63
        # after a restart the store still has the answer
        node.kill()
        node.start()
        stub = node.stub()
        assert step(stub, session, inputs, first_id) == first
        assert stub.GetSession(memserve_pb2.GetSessionRequest(session_id=session)).step == 63
        assert stub.CreateSession(create).session_id == session
        # past the documented bound (16 answered ids per session), an id is new again
        for _ in range(16):
            step(stub, session, inputs[:1], new_id())
        rerun = step(stub, session, inputs, first_id)
        assert rerun.step == 63 + 16 + 3
    finally:
        node.stop()


def test_a_cancelled_turn_leaves_the_session_exactly_as_it_was(
    tmp_path: Path, chat_model: Path
) -> None:
    with ServerProcess(tmp_path, "--models", f"{chat_model}", *ARGS) as server:
        stub = server.stub()
        session = stub.CreateSession(memserve_pb2.CreateSessionRequest(model=CHAT)).session_id
        generate(stub, session, "hi ! do you like dogs ?", seed=1)
        before = state_of(stub, session)
        step_before = stub.GetSession(memserve_pb2.GetSessionRequest(session_id=session)).step
        request = memserve_pb2.GenerateRequest(
            session_id=session, text="tell me about your family", seed=2, max_tokens=LIMIT
        )
        replies = stub.Generate(request)
        assert next(replies).HasField("text")  # the turn is under way: its prompt is written
        replies.cancel()
        # The turn stops at the server's next launch and is undone: wait for that, then
        # compare (its step count goes back together with its state).
        deadline = time.monotonic() + 60
        while (
            stub.GetSession(memserve_pb2.GetSessionRequest(session_id=session)).step != step_before
        ):
            assert time.monotonic() < deadline, "the cancelled turn was not undone"
            time.sleep(0.01)
        assert same_state(state_of(stub, session), before)
        # and the next turn goes as if the cancelled one never happened
        with ServerProcess(tmp_path, "--models", f"{chat_model}", *ARGS) as other:
            ref = other.stub()
            twin = ref.CreateSession(memserve_pb2.CreateSessionRequest(model=CHAT)).session_id
            generate(ref, twin, "hi ! do you like dogs ?", seed=1)
            assert generate(stub, session, "what now ?", 3) == generate(ref, twin, "what now ?", 3)


# ---------------------------------------------------------------------------- damage


def test_a_damaged_record_fails_its_session_only(tmp_path: Path, chat_model: Path) -> None:
    directory = tmp_path / "store"
    node = Node(tmp_path, f"dir:{directory}", chat_model).start()
    rng = np.random.default_rng()
    try:
        stub = node.stub()
        ids = [
            stub.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
            for _ in range(2)
        ]
        marker = np.full((2, 9), 0.123456, np.float32)  # rows to find in the store's bytes
        step(stub, ids[0], marker, new_id())
        step(stub, ids[1], rng.random((2, 9), dtype=np.float32), new_id())
        node.kill()
        wal = sorted(directory.glob("wal-*.log"))[-1]
        data = bytearray(wal.read_bytes())
        at = data.find(marker[0].tobytes())
        assert at > 0
        data[at + 3] ^= 0x10
        wal.write_bytes(bytes(data))
        node.start()
        stub = node.stub()
        with pytest.raises(grpc.RpcError) as lost:
            step(stub, ids[0], marker[:1])
        assert lost.value.code() == grpc.StatusCode.DATA_LOSS
        assert ids[0] in (lost.value.details() or "")
        assert step(stub, ids[1], marker[:1]).step == 3  # the other is served
        damage = [e for e in node.running.events() if e.get("event") == "store_damage"]
        assert damage and "CRC" in damage[0]["message"]
    finally:
        node.stop()


def test_a_record_cut_short_by_the_crash_is_dropped_whole(tmp_path: Path, chat_model: Path) -> None:
    """The last write of a drain (a snapshot) cut short: the session comes back from its
    calls instead, at the same step and with the same state."""
    directory = tmp_path / "store"
    node = Node(tmp_path, f"dir:{directory}", chat_model).start()
    rng = np.random.default_rng()
    try:
        stub = node.stub()
        session = stub.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
        step(stub, session, rng.random((5, 9), dtype=np.float32), new_id())
        expected = state_of(stub, session)
        node.stop()  # drains: writes the session's snapshot last
        wal = sorted(directory.glob("wal-*.log"))[-1]
        os.truncate(wal, wal.stat().st_size - 100)
        node.start()
        stub = node.stub()
        assert same_state(state_of(stub, session), expected)
        assert any("cut short" in e["message"] for e in node.running.events()
                   if e.get("event") == "store_damage")  # fmt: skip
    finally:
        node.stop()


def test_sessions_made_with_other_weights_are_refused_naming_the_digests(
    tmp_path: Path, chat_model: Path
) -> None:
    directory = tmp_path / "store"
    node = Node(tmp_path, f"dir:{directory}", chat_model).start()
    stub = node.stub()
    session = stub.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    node.stop()
    changed = tmp_path / "weights" / "ntm-copy"  # served under the same name
    shutil.copytree(checkpoint.resolve("ntm-copy"), changed)
    model = checkpoint.load(changed)
    with __import__("torch").no_grad():
        next(model.parameters()).add_(1e-3)
    checkpoint.save(model, changed, model.provenance)
    other = Node(tmp_path, f"dir:{directory}", chat_model)
    other.args = ("--store", f"dir:{directory}", "--models", str(changed), *ARGS)
    other.start()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            step(other.stub(), session, np.zeros((1, 9), np.float32))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "other weights" in (refused.value.details() or "")
    finally:
        other.stop()


# ---------------------------------------------------------------------------- redis down


def test_while_redis_is_down_calls_are_unavailable_and_nothing_acknowledged_is_lost(
    tmp_path: Path, chat_model: Path
) -> None:
    rng = np.random.default_rng()
    with RedisServer(tmp_path / "redis") as redis_server:
        node = Node(tmp_path, redis_server.url, chat_model).start()
        try:
            stub = node.stub()
            health = health_pb2_grpc.HealthStub(node.running.channel())
            session = stub.CreateSession(
                memserve_pb2.CreateSessionRequest(model="ntm-copy")
            ).session_id
            acknowledged = step(stub, session, rng.random((4, 9), dtype=np.float32), new_id())
            redis_server.kill()
            pending_id, pending = new_id(), rng.random((2, 9), dtype=np.float32)
            with pytest.raises(grpc.RpcError) as down:
                step(stub, session, pending, pending_id)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            statuses = iter(watch)
            assert any(m.status == health_pb2.HealthCheckResponse.NOT_SERVING for m in statuses)
            redis_server.start()
            assert any(m.status == health_pb2.HealthCheckResponse.SERVING for m in statuses)
            watch.cancel()
            retried = step(stub, session, pending, pending_id)
            assert retried.step == acknowledged.step + 2
            node.kill()
            node.start()
            info = node.stub().GetSession(memserve_pb2.GetSessionRequest(session_id=session))
            assert info.step == acknowledged.step + 2
        finally:
            node.stop()


# ---------------------------------------------------------------------------- soak


@dataclass
class History:
    """One session's acknowledged calls, in order, with what they answered."""

    model: str
    session: str
    calls: list[tuple[str, Any, Any]] = field(default_factory=list)  # kind, request, answer


class Client:
    """A session's caller: calls with request ids, retried across crashes until answered."""

    def __init__(self, node: Node, history: History, seed: int, stop: threading.Event) -> None:
        self.node, self.history, self.stop = node, history, stop
        self.rng = np.random.default_rng(seed)
        self.acked = 0
        self.retries = 0  # calls sent again after a kill cut them off
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.history.model == CHAT:
                    turn = len(self.history.calls)
                    text, seed = f"turn {turn} : what do you do for fun ?", 100 + turn
                    answer = self._retried("generate", (text, seed))
                    self.history.calls.append(("generate", (text, seed), answer))
                else:
                    inputs = self.rng.random((int(self.rng.integers(1, 40)), 9), dtype=np.float32)
                    answer = self._retried("step", inputs)
                    self.history.calls.append(("step", inputs, answer))
                with self.node.changed:
                    self.acked += 1
                    self.node.changed.notify_all()
        except BaseException as error:  # reported by the test
            self.error = error

    def _retried(self, kind: str, request: Any) -> Any:
        """One call, sent again with the same request id until a server answers it."""
        request_id = new_id()
        session = self.history.session
        while True:
            with self.node.changed:
                generation, stub = self.node.generation, self.node.stub()
            try:
                if kind == "step":
                    return step(stub, session, request, request_id)
                text, seed = request
                return generate(stub, session, text, seed, request_id)
            except grpc.RpcError as error:
                if error.code() not in RETRIED:
                    raise
            self.retries += 1
            with self.node.changed:  # the server is being killed: wait for the next one
                started = self.node.changed.wait_for(
                    partial(self._restarted, generation), timeout=120
                )
            if not started:
                raise TimeoutError("the server did not come back")

    def _restarted(self, generation: int) -> bool:
        return self.node.generation > generation or self.stop.is_set()


@pytest.mark.parametrize(("kind", "kills"), [("dir", 12), ("redis", 8)])
def test_kill_9_under_load_loses_no_acknowledged_step_and_doubles_none(
    kind: str, kills: int, tmp_path: Path, chat_model: Path
) -> None:
    """Sessions of ntm-copy and the small VMED under Step and Generate calls while the server
    is killed with SIGKILL at random moments and started again; each session's acknowledged
    calls, replayed in order on a server that never stopped, answer the same bit for bit."""
    chooser = random.Random()
    with store(kind, tmp_path) as (url, _):
        node = Node(tmp_path, url, chat_model).start()
        stop = threading.Event()
        try:
            stub = node.stub()
            histories = [
                History(model, stub.CreateSession(
                    memserve_pb2.CreateSessionRequest(model=model, request_id=new_id())).session_id)
                for model in ("ntm-copy",) * 4 + (CHAT,) * 2
            ]  # fmt: skip
            clients = [Client(node, h, i, stop) for i, h in enumerate(histories)]
            threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
            for thread in threads:
                thread.start()

            def acknowledged(target: int) -> bool:
                return sum(c.acked for c in clients) >= target or any(c.error for c in clients)

            for _ in range(kills):
                target = sum(c.acked for c in clients) + chooser.randint(3, 12)
                with node.changed:
                    node.changed.wait_for(partial(acknowledged, target), timeout=120)
                assert not any(c.error for c in clients), [c.error for c in clients]
                node.kill()
                node.start()
            stop.set()
            with node.changed:
                node.changed.notify_all()
            for thread in threads:
                thread.join(120)
            assert not any(c.error for c in clients), [c.error for c in clients]
            final = node.stub()
            with ServerProcess(tmp_path, "--models", f"ntm-copy,{chat_model}", *ARGS) as reference:
                for history in histories:
                    replay(reference.stub(), history.model, history.calls, final, history.session)
            assert sum(len(h.calls) for h in histories) >= kills * 3
            # every kill cut off calls in flight (six clients are always calling)
            assert sum(c.retries for c in clients) >= kills
        finally:
            stop.set()
            node.stop()


def test_a_stored_session_from_before_the_said_record_still_loads(
    tmp_path: Path, chat_model: Path
) -> None:
    """A dialogue session a store holds in the state layout from before VMED states held
    `said` (written here as such a server wrote it: a SessionCreated record whose state
    lacks it) is loaded with an empty record and answers as an import of that same state."""
    from safetensors.torch import load as load_safetensors

    from protos import journal_pb2
    from serving.durable import open_store
    from serving.export import export_state, import_state

    directory = tmp_path / "store"
    node = Node(tmp_path, f"dir:{directory}", chat_model).start()
    try:
        stub = node.stub()
        made = stub.CreateSession(memserve_pb2.CreateSessionRequest(model=CHAT)).session_id
        generate(stub, made, "hi ! do you like dogs ?", seed=1)
        exported = import_state(
            stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=made)).state
        )
    finally:
        node.stop()
    assert bool(exported.tensors["said"].any())
    older = {name: t for name, t in exported.tensors.items() if name != "said"}
    state = export_state(older, CHAT, exported.model_digest, exported.step)
    assert "said" not in load_safetensors(state)
    session = new_id()
    created = journal_pb2.SessionCreated(
        session_id=session, model=CHAT, weights_digest=exported.model_digest,
        ttl_seconds=3600, step=exported.step, unix_time=time.time(), state=state,
    )  # fmt: skip
    stored = open_store(f"dir:{directory}")
    try:
        stored.commit([journal_pb2.Record(created=created)])
    finally:
        stored.close()
    node.start()
    try:
        stub = node.stub()
        twin = stub.ImportSession(memserve_pb2.ImportSessionRequest(state=state)).session_id
        assert generate(stub, session, "what now ?", 3) == generate(stub, twin, "what now ?", 3)
    finally:
        node.stop()

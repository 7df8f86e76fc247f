"""A server's engines in this process over real model processes, with every request that
crosses the pipe recorded: the front end starts and serves without loading weights, a new
session's slot is reset and a fork's copied in the worker (no state crosses the pipe), and
parking carries exactly the states it must."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from bench.redis_server import RedisServer
from kernels.backend import BACKEND_ENV
from models import checkpoint
from models.controller import ControllerMemoryModel
from models.fused import fused_step
from serving import loading
from serving.config import ServerConfig
from serving.protocol import CopySlot, Launch, ReadSlot, Request, ResetSlot, WriteSlot
from serving.replica import Replica
from serving.server import Server
from serving.worker_client import WorkerClient


class RecordingWorker(WorkerClient):
    """A real worker client that also remembers every request it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Request] = []

    def send(self, request: Request) -> asyncio.Future[Any]:
        self.sent.append(request)
        return super().send(request)

    def take(self) -> list[str]:
        """The kinds of request sent since the last call (launches as "Launch")."""
        kinds, self.sent = [type(request).__name__ for request in self.sent], []
        return kinds


def no_weights(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the front end loaded model weights")


@pytest.fixture
def front_end_without_weights() -> Iterator[None]:
    """Any weight loading in this process fails the test; the model processes are spawned
    fresh and load theirs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        patch.setattr(checkpoint, "load", no_weights)
        patch.setattr(safetensors.torch, "load_file", no_weights)
        patch.setattr(loading, "WorkerClient", RecordingWorker)
        yield


def test_sessions_are_made_in_the_worker_and_only_parking_carries_state(
    tmp_path: Path, front_end_without_weights: None
) -> None:
    config = ServerConfig(models=("ntm-copy",), slots=2, threads=1, park_dir=str(tmp_path))
    server = Server(config)
    server.load_models()
    engine = server.engines["ntm-copy"]
    worker = engine.worker
    assert isinstance(worker, RecordingWorker)
    rng = np.random.default_rng()

    async def scenario() -> None:
        engine.start()
        try:
            lifecycle = engine.lifecycle
            first = await lifecycle.create(None, None)
            assert worker.take() == ["ResetSlot"]
            await engine.step(first, rng.random((3, 9), dtype=np.float32), None)
            assert worker.take() == ["Launch"]  # three steps back to back in one launch
            child = await lifecycle.fork(first, None)  # the second slot was free
            assert worker.take() == ["CopySlot"]
            assert child.step == first.step == 3
            third = await lifecycle.create(None, None)  # no free slot: an idle one is parked
            assert worker.take() == ["ReadSlot", "ResetSlot"]
            parked = first if first.slot is None else child
            assert engine.slots.residence(parked) == "parked_host"
            grandchild = await lifecycle.fork(parked, None)  # a copy in the store, no pipe
            assert worker.take() == [] and grandchild.slot is None
            await engine.step(grandchild, rng.random((1, 9), dtype=np.float32), None)
            sent = worker.sent
            assert worker.take() == ["Launch"]  # restored inside the launch, parking another
            launch = sent[0]
            assert isinstance(launch, Launch) and len(launch.park) == len(launch.restore) == 1
            await lifecycle.export(third)
            assert worker.take() == ["ReadSlot"]
        finally:
            await engine.stop()

    asyncio.run(scenario())
    kinds = {ResetSlot, CopySlot, ReadSlot, WriteSlot, Launch}
    assert all(type(request) in kinds for request in worker.sent)


def test_the_model_process_serves_the_bits_of_the_in_process_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine and a real model process, on a CPU (the fused C step, built or
    found in the same cache): three sessions' calls of 1 to 5 steps, batched however the
    engine batches them, give the bits of each session stepped alone in this process."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    model = checkpoint.load("ntm-copy")
    assert isinstance(model, ControllerMemoryModel)
    assert fused_step(model, model.new_pool(1)) is not None
    rng = np.random.default_rng()
    calls = {name: [rng.random((t, 9), dtype=np.float32) for t in rng.integers(1, 6, 4)]
             for name in "abc"}  # fmt: skip
    server = Server(ServerConfig(models=("ntm-copy",), slots=3, threads=1,
                                 park_dir=str(tmp_path)))  # fmt: skip
    server.load_models()
    engine = server.engines["ntm-copy"]

    async def scenario() -> dict[str, list[np.ndarray]]:
        engine.start()
        try:
            sessions = {name: await engine.lifecycle.create(None, None) for name in calls}

            async def run(name: str) -> list[np.ndarray]:
                return [(await engine.step(sessions[name], x, None))[0] for x in calls[name]]

            results = await asyncio.gather(*(run(name) for name in calls))
            return dict(zip(calls, results, strict=True))
        finally:
            await engine.stop()

    served = asyncio.run(scenario())
    for name, inputs in calls.items():
        pool = model.new_pool(1)
        model.reset(pool, [0])
        for x, got in zip(inputs, served[name], strict=True):
            want = np.stack([model.step(pool, torch.tensor([0]), torch.from_numpy(row[None]))[0]
                             for row in x])  # fmt: skip
            assert np.array_equal(got, want), name


def test_calls_that_arrive_while_a_commit_is_written_go_out_together_after_it(
    tmp_path: Path, front_end_without_weights: None
) -> None:
    """With `--durability launch` no launch is sent while the calls of a landed one wait
    for their commit: the calls that arrive meanwhile go out in one launch once it is
    written, and that launch's calls are committed by one write."""
    config = ServerConfig(
        models=("ntm-copy",), slots=4, threads=1, park_dir=str(tmp_path / "park"),
        store=f"dir:{tmp_path / 'store'}", durability="launch",
    )  # fmt: skip
    server = Server(config)
    server.load_models()
    engine, store, committer = server.engines["ntm-copy"], server.session_store, server.committer
    worker = engine.worker
    assert isinstance(worker, RecordingWorker) and committer is not None
    gate, writing, writes = threading.Event(), threading.Event(), []
    write = store.commit

    def gated_write(records: Any) -> set[str]:  # in the committer's thread
        writes.append(len(records))
        writing.set()
        gate.wait()
        return write(records)

    store.commit = gated_write  # type: ignore[method-assign]
    rng = np.random.default_rng()

    def launched() -> list[int]:
        """The rows of each launch sent since the last look."""
        sent = [r for r in worker.sent if isinstance(r, Launch)]
        worker.sent = []
        return [sum(len(batch.slots) for batch in launch.batches) for launch in sent]

    async def scenario() -> None:
        committer.start()
        engine.start()
        try:
            gate.set()
            a, b, c, d = [await engine.lifecycle.create(None, None) for _ in range(4)]
            gate.clear()
            writing.clear()
            writes.clear()
            launched()
            first = asyncio.ensure_future(engine.step(a, rng.random((1, 9), np.float32), None))
            # a's launch landed; its commit is being written
            assert await asyncio.to_thread(writing.wait, 60)
            assert launched() == [1] and writes == [1] and not first.done()
            others = [
                asyncio.ensure_future(engine.step(s, rng.random((1, 9), np.float32), None))
                for s in (b, c, d)
            ]
            while engine.scheduler.queued_calls < 3 or engine.wake.is_set():
                await asyncio.sleep(0)  # until the batch loop has seen the three calls
            assert launched() == [], "a launch went out while a commit was being written"
            writing.clear()
            gate.set()
            await asyncio.gather(first, *others)
            assert launched() == [3]  # b, c and d together
            assert writes == [1, 3]  # and their three calls in one write
            assert [s.step for s in (a, b, c, d)] == [1, 1, 1, 1]
        finally:
            gate.set()
            await engine.stop()
            await committer.stop()

    asyncio.run(scenario())


def test_a_replica_claims_a_session_it_brings_back_before_its_calls_can_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that brings a session back from the shared Redis store records itself as
    its owner (the claim) while the session is still stored: a call that arrives during the
    claim waits for it, and the session is replayed once, not a second time because that
    call's own commit reached the store before the claim and looked like another replica's.
    The outputs are the bits of the same calls stepped alone in this process."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    monkeypatch.setattr(loading, "WorkerClient", RecordingWorker)
    model = checkpoint.load("ntm-copy")
    rng = np.random.default_rng()
    inputs = [rng.random((2, 9), dtype=np.float32) for _ in range(2)]
    with RedisServer(tmp_path / "redis") as redis_server:
        config = ServerConfig(
            models=("ntm-copy",), slots=2, threads=1, park_dir=str(tmp_path / "park"),
            store=redis_server.url, durability="launch", replica="a",
        )  # fmt: skip
        server = Server(config)
        server.load_models()
        engine, store = server.engines["ntm-copy"], server.session_store
        committer = server.committer
        worker, replica = engine.worker, server.service.replica
        assert isinstance(worker, RecordingWorker) and committer is not None
        assert isinstance(replica, Replica) and store is not None
        gate, claiming = threading.Event(), threading.Event()
        claim = store.claim

        def gated_claim(session_id: str) -> int | None:  # in the committer's thread
            claiming.set()
            gate.wait()
            return claim(session_id)

        store.claim = gated_claim  # type: ignore[method-assign]

        async def scenario() -> list[tuple[np.ndarray, int]]:
            committer.start()
            engine.start()
            try:
                made = await engine.lifecycle.create(None, None)  # handed to the store
                session = await replica.find(made.id)
                assert session is not None and engine.slots.is_stored(session)
                worker.take()
                first = asyncio.ensure_future(engine.step(session, inputs[0], None))
                assert await asyncio.to_thread(claiming.wait, 60)  # its load is claiming
                second = asyncio.ensure_future(engine.step(session, inputs[1], None))
                if not engine.slots.is_stored(session):
                    # a server that unstores before claiming (before bb23c66) serves it at once:
                    # its commit lands first, so such a server fails below every time, not by luck
                    await second
                gate.set()
                served = await asyncio.gather(first, second)
                assert worker.take().count("Replay") == 1, "the session was brought back twice"
                return list(served)
            finally:
                gate.set()
                await engine.stop()
                await committer.stop()

        served = asyncio.run(scenario())
    assert sorted(step for _, step in served) == [2, 4]
    pool = model.new_pool(1)
    model.reset(pool, [0])
    for call in sorted(range(2), key=lambda call: served[call][1]):  # in the order served
        want = [model.step(pool, torch.tensor([0]), torch.from_numpy(row[None]))[0]
                for row in inputs[call]]  # fmt: skip
        assert np.array_equal(served[call][0], np.stack(want))


async def until(moment: float) -> None:
    while time.monotonic() < moment:  # the time itself is the point
        await asyncio.sleep(0.05)


def call_outlasting_ttl(
    tmp_path: Path, ttl: float, begin: float, end: float, sweeps: bool
) -> tuple[int, int | None]:
    """A replica on a real Redis makes a session with `ttl`, steps it once, and `begin`
    seconds after that begins a second call under which its model's process stops until
    `end` seconds after the first; the second call's step and the session's committed step
    in the store after it. Without `sweeps`, the engine's expiry sweep (every 0.25 s here)
    is stopped before the second call."""
    rng = np.random.default_rng()
    with RedisServer(tmp_path / "redis") as redis_server:
        config = ServerConfig(
            models=("ntm-copy",), slots=2, threads=1, park_dir=str(tmp_path / "park"),
            store=redis_server.url, durability="launch", replica="a", session_ttl=1.0,
        )  # fmt: skip
        server = Server(config)
        server.load_models()
        engine, store = server.engines["ntm-copy"], server.session_store
        committer, replica = server.committer, server.service.replica
        assert committer is not None and isinstance(replica, Replica) and store is not None

        async def scenario() -> tuple[int, int | None]:
            committer.start()
            engine.start()
            pid = engine.worker.pid
            assert pid is not None
            try:
                made = await engine.lifecycle.create(ttl, None)  # handed to the store
                session = await replica.find(made.id)
                assert session is not None
                await engine.step(session, rng.random((1, 9), dtype=np.float32), None)
                used = time.monotonic()  # after its commit restarted its expiry
                if not sweeps:
                    engine.tasks[1].cancel()
                await until(used + begin)
                os.kill(pid, signal.SIGSTOP)
                try:
                    call = asyncio.ensure_future(
                        engine.step(session, rng.random((1, 9), dtype=np.float32), None)
                    )
                    await until(used + end)
                    assert not call.done()
                    assert store.committed_step(session.id) == 1, "it expired under its call"
                finally:
                    os.kill(pid, signal.SIGCONT)
                _, step = await call
                return step, store.committed_step(session.id)
            finally:
                await engine.stop()
                await committer.stop()

        return asyncio.run(scenario())


def test_a_replica_keeps_a_session_alive_in_redis_while_a_call_outlasts_its_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster's Redis ends a session nobody used for its TTL, but a call in progress is a
    use: the replica's expiry sweeps keep it alive under a call twice as long as its TTL."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert call_outlasting_ttl(tmp_path, ttl=3.0, begin=0.0, end=6.0, sweeps=True) == (2, 2)


def test_a_call_that_begins_late_in_the_ttl_restarts_its_sessions_expiry_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that begins with a fifth of the session's TTL left restarts its expiry as it
    begins, not at the next sweep (stopped here): it outlasts the deadline it began under
    (2 s) by 0.6 s, 1 s before the one its beginning set."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert call_outlasting_ttl(tmp_path, ttl=2.0, begin=1.6, end=2.6, sweeps=False) == (2, 2)

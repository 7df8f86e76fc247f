"""A snapshot never drops an answer a request id still needs: not one taken when a session
is parked while its call's commit is in flight, nor the drain's, which follows a Step it cut
short. Engines in this process over real model processes and a real `dir:` store; the
store's own `load` after the server stopped, and a second server on the same store, are the
reference."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels.backend import BACKEND_ENV
from protos import journal_pb2
from serving.config import ServerConfig
from serving.durable.directory import DirectorySessionStore
from serving.engine import ModelEngine
from serving.errors import FailedPrecondition, Unavailable
from serving.persistence import Checkpoint
from serving.server import Server


@pytest.fixture(autouse=True)
def torch_backend() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


def durable_server(tmp_path: Path, **settings: Any) -> Server:
    settings.setdefault("durability", "launch")
    config = ServerConfig(
        models=("ntm-copy",), threads=1, park_dir=str(tmp_path / "park"),
        store=f"dir:{tmp_path / 'store'}", **settings,
    )  # fmt: skip
    server = Server(config)
    server.load_models()
    return server


def restarted(tmp_path: Path, **settings: Any) -> Server:
    """A server on the store an earlier one left, knowing its sessions."""
    server = durable_server(tmp_path, **settings)
    server.adopt_stored_sessions()
    return server


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[ModelEngine]:
    """The server's engine and its store's writer at work; stopped on the way out as a
    drain stops them (calls still running cut short, sessions snapshotted)."""
    engine, committer = server.engines["ntm-copy"], server.committer
    assert committer is not None
    committer.start()
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
        await committer.stop()


def answers_kept(tmp_path: Path, session_id: str) -> dict[str, str]:
    """The request ids the store answers for the session, each with what it was told."""
    store = DirectorySessionStore(tmp_path / "store")
    try:
        kept = store.load(session_id).responses
    finally:
        store.close()
    return {r.request_id: r.cancelled or f"step {r.step.step}" for r in kept}


def test_a_session_parked_while_its_commit_is_written_keeps_the_answer(tmp_path: Path) -> None:
    """One slot and a snapshot due at every step: creating a second session parks the first
    while its Step's commit (with the answer of its request id) is being written. A snapshot
    then, without that answer, would make the call's record dead, and a retry after a
    restart would step again."""
    server = durable_server(tmp_path, slots=1, snapshot_every=1)
    engine, store, committer = server.engines["ntm-copy"], server.session_store, server.committer
    assert committer is not None
    gate, writing = threading.Event(), threading.Event()
    write = store.commit

    def gated_write(records: Any) -> set[str]:  # in the committer's thread
        writing.set()
        gate.wait()
        return write(records)

    store.commit = gated_write  # type: ignore[method-assign]

    async def scenario() -> str:
        async with running(server):
            try:
                return await park_while_committing()
            finally:
                gate.set()

    async def park_while_committing() -> str:
        gate.set()
        a = await engine.lifecycle.create(None, None)
        gate.clear()
        writing.clear()
        inputs = np.ones((1, 9), np.float32)
        first = asyncio.ensure_future(engine.step(a, inputs, None, "r1", b"digest"))
        assert await asyncio.to_thread(writing.wait, 60)  # a's commit is being written
        writing.clear()
        making = asyncio.ensure_future(engine.lifecycle.create(None, None))
        while a.id not in engine.slots.parked:
            await asyncio.sleep(0)  # until the new session's slot was taken from a
        gate.set()
        _, step = await first
        await making
        assert step == 1
        return a.id

    session_id = asyncio.run(scenario())
    assert answers_kept(tmp_path, session_id) == {"r1": "step 1"}


def kind(record: journal_pb2.Record) -> str | None:
    name: str | None = record.WhichOneof("record")
    return name


def stored_step(tmp_path: Path, session_id: str) -> int:
    store = DirectorySessionStore(tmp_path / "store")
    try:
        return store.load(session_id).step
    finally:
        store.close()


def test_a_park_whose_write_was_refused_is_written_by_the_drain(tmp_path: Path) -> None:
    """`--durability park`: a session parked while the store refuses its snapshot keeps
    its steps counted as unwritten, so the drain's checkpoint writes them (before, they
    counted as written, the drain passed the session by and its steps were lost)."""
    server = durable_server(tmp_path, slots=1, durability="park")
    store = server.session_store
    refuse, refused = threading.Event(), threading.Event()
    write = store.commit

    def refusing_write(records: Any) -> set[str]:  # in the committer's thread
        snapshots = {r.snapshot.session_id for r in records if kind(r) == "snapshot"}
        if refuse.is_set() and snapshots:
            refuse.clear()
            refused.set()
            return write([r for r in records if kind(r) != "snapshot"]) | snapshots
        return write(records)

    store.commit = refusing_write  # type: ignore[method-assign]

    async def scenario() -> str:
        async with running(server) as engine:
            a = await engine.lifecycle.create(None, None)
            for _ in range(3):
                await engine.step(a, np.ones((1, 9), np.float32), None)
            refuse.set()
            await engine.lifecycle.create(None, None)  # takes a's slot: a is parked
            assert await asyncio.to_thread(refused.wait, 60)  # and its write refused
            return a.id

    session_id = asyncio.run(scenario())  # stopped as a drain stops it: the checkpoint
    assert stored_step(tmp_path, session_id) == 3


def test_a_session_whose_commit_failed_is_not_written_in_whole_by_the_drain(
    tmp_path: Path,
) -> None:
    """A Step's commit that the store refuses lands while the drain's checkpoint waits for
    the commits in flight: the call is answered UNAVAILABLE and the session is to be
    unloaded, so the checkpoint must not write its state, a step ahead of the store (the
    caller, told it failed, would retry and take the step twice)."""
    server = durable_server(tmp_path, slots=2)
    engine, store, committer = server.engines["ntm-copy"], server.session_store, server.committer
    assert committer is not None
    gate, writing = threading.Event(), threading.Event()
    write = store.commit

    def refusing_calls(records: Any) -> set[str]:  # in the committer's thread
        calls = {r.call.session_id for r in records if kind(r) == "call"}
        if not calls:
            return write(records)
        writing.set()
        gate.wait()
        return write([r for r in records if kind(r) != "call"]) | calls

    store.commit = refusing_calls  # type: ignore[method-assign]

    async def scenario() -> tuple[str, Checkpoint]:
        async with running(server):
            try:
                a = await engine.lifecycle.create(None, None)
                call = asyncio.ensure_future(
                    engine.step(a, np.ones((1, 9), np.float32), None, "r1", b"digest")
                )
                assert await asyncio.to_thread(writing.wait, 60)  # its commit is being written
                checkpoint = asyncio.ensure_future(engine.persistence.checkpoint())
                while not any(not records for records, _ in committer.waiting):
                    await asyncio.sleep(0)  # until the checkpoint, holding the lock, waits
                gate.set()
                written = await checkpoint
                with pytest.raises(Unavailable, match="refused"):
                    await call
                return a.id, written
            finally:
                gate.set()

    session_id, written = asyncio.run(scenario())
    assert written == Checkpoint(0, 0)
    assert stored_step(tmp_path, session_id) == 0


def test_a_step_cut_short_by_the_drain_keeps_its_answer_through_the_drains_snapshot(
    tmp_path: Path,
) -> None:
    """A 64-step Step with a request id, one step a launch, cut short by the drain: its
    steps stay, the drain snapshots the session, and a repeat of the id on the next server
    is FAILED_PRECONDITION saying how far it went, not 64 more steps."""
    steps = 64
    inputs = np.random.default_rng(0).random((steps, 9), dtype=np.float32)

    async def first_server() -> tuple[str, int]:
        async with running(durable_server(tmp_path, slots=2, steps_per_launch=1)) as engine:
            a = await engine.lifecycle.create(None, None)
            call = asyncio.ensure_future(engine.step(a, inputs, None, "r1", b"digest"))
            while a.step < 1:
                await asyncio.sleep(0)  # until its first launch landed
        # stopped as a drain stops it: the call cut short, then the session snapshotted
        with pytest.raises(Exception, match="shut down"):
            await call
        assert 1 <= a.step < steps
        return a.id, a.step

    session_id, taken = asyncio.run(first_server())
    told = f"cut short after {taken} of {steps} steps"
    assert answers_kept(tmp_path, session_id) == {"r1": told}

    async def second_server() -> int:
        server = restarted(tmp_path, slots=2, steps_per_launch=1)
        async with running(server) as engine:
            session = server.table.get(session_id)
            with pytest.raises(FailedPrecondition, match=f"{told}; the session is at step {taken}"):
                await engine.step(session, inputs, None, "r1", b"digest")
            return session.step

    assert asyncio.run(second_server()) == taken


def test_a_stored_call_this_server_cannot_replay_is_data_loss_for_its_session(
    tmp_path: Path,
) -> None:
    """A record intact on the disk (its CRC holds) whose operation this server does not
    know: the session answers DATA_LOSS saying so, every time, rather than another error
    and a load tried again at each call."""
    from protos import journal_pb2
    from serving.errors import DataLoss

    async def first_server() -> str:
        async with running(durable_server(tmp_path, slots=2)) as engine:
            a = await engine.lifecycle.create(None, None)
            await engine.step(a, np.ones((1, 9), np.float32), None)
            return a.id

    session_id = asyncio.run(first_server())
    store = DirectorySessionStore(tmp_path / "store")
    unknown = journal_pb2.CallCommitted(
        session_id=session_id, from_step=1, to_step=2, operations=[journal_pb2.Operation()]
    )
    assert store.commit([journal_pb2.Record(call=unknown)]) == set()
    store.close()

    async def second_server() -> None:
        server = restarted(tmp_path, slots=2)
        async with running(server) as engine:
            session = server.table.get(session_id)
            for _ in range(2):
                with pytest.raises(DataLoss, match="an operation of unknown kind"):
                    await engine.step(session, np.ones((1, 9), np.float32), None)

    asyncio.run(second_server())

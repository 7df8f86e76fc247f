"""The session stores on their own, `dir:` and `redis://` (a real redis-server): what is
committed comes back after reopening (for Redis, after a kill -9 of redis-server), refused
records change nothing, and damage (a torn tail, a flipped byte) is found, reported and
confined to the sessions it touches."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from bench.redis_server import RedisServer
from protos import journal_pb2, memserve_pb2, tensors
from serving.durable.appender import SEGMENT_START
from serving.durable.base import SessionStore
from serving.durable.directory import DirectorySessionStore
from serving.durable.records import HEADER, frame
from serving.durable.redis_store import RedisSessionStore
from serving.durable.segments import segment_path
from serving.errors import DataLoss
from serving.sessions import new_session_id

# A store, and how to open it again as a restarted server would.
Reopen = Callable[[], SessionStore]


@pytest.fixture(params=["dir", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SessionStore, Reopen]]:
    if request.param == "dir":
        opened: list[SessionStore] = [DirectorySessionStore(tmp_path / "store")]

        def reopen_directory() -> SessionStore:
            opened[-1].close()
            opened.append(DirectorySessionStore(tmp_path / "store"))
            return opened[-1]

        yield opened[0], reopen_directory
        opened[-1].close()
        return
    with RedisServer(tmp_path / "redis") as server:

        def reopen_redis() -> SessionStore:
            server.kill()  # kill -9: only what Redis fsynced survives
            server.start()
            return RedisSessionStore(server.url)

        yield RedisSessionStore(server.url), reopen_redis


def created(session_id: str, step: int = 0, state: bytes = b"") -> journal_pb2.Record:
    return journal_pb2.Record(
        created=journal_pb2.SessionCreated(
            session_id=session_id, model="ntm-copy", weights_digest="d" * 64, ttl_seconds=60.0,
            seed=7, step=step, state=state,
        )
    )  # fmt: skip


def call(session_id: str, start: int, end: int, request_id: str = "") -> journal_pb2.Record:
    rows = np.random.default_rng(start).random((end - start, 9), dtype=np.float32)
    record = journal_pb2.CallCommitted(
        session_id=session_id,
        from_step=start,
        to_step=end,
        operations=[journal_pb2.Operation(step=tensors.encode(row)) for row in rows],
    )
    if request_id:
        record.response.request_id = request_id
        record.response.step.CopyFrom(memserve_pb2.StepResponse(step=end))
    return journal_pb2.Record(call=record)


def snapshot(session_id: str, step: int) -> journal_pb2.Record:
    return journal_pb2.Record(
        snapshot=journal_pb2.Snapshot(session_id=session_id, step=step, state=os.urandom(4000))
    )


def deleted(session_id: str) -> journal_pb2.Record:
    return journal_pb2.Record(deleted=journal_pb2.SessionDeleted(session_id=session_id))


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("wal-*.log"))


def test_what_is_committed_comes_back_after_reopening(
    store: tuple[SessionStore, Reopen],
) -> None:
    first, reopen = store
    assert first.commit([created("a"), created("b", step=5, state=b"exported")]) == set()
    assert first.commit([call("a", 0, 3, "r1"), call("b", 5, 6), call("a", 3, 4, "r2")]) == set()
    again = reopen()
    summaries = {s.session_id: s for s in again.sessions()}
    assert {k: (s.step, s.model, s.seed, s.error) for k, s in summaries.items()} == {
        "a": (4, "ntm-copy", 7, None),
        "b": (6, "ntm-copy", 7, None),
    }
    a = again.load("a")
    assert a.step == 4 and a.snapshot is None
    assert [(c.from_step, c.to_step) for c in a.calls] == [(0, 3), (3, 4)]
    assert [r.request_id for r in a.responses] == ["r1", "r2"]
    assert a.calls[0] == call("a", 0, 3, "r1").call
    assert again.load("b").created.state == b"exported"
    assert again.problems() == []
    with pytest.raises(KeyError):
        again.load("never")


def test_refused_records_change_nothing(store: tuple[SessionStore, Reopen]) -> None:
    first, reopen = store
    first.commit([created("a"), created("b"), snapshot("b", 4)])
    refused = first.commit(
        [call("a", 1, 2), call("ghost", 0, 1), created("a"), snapshot("b", 3), call("b", 0, 1)]
    )
    assert refused == {"a", "b", "ghost"}
    assert {s.session_id: s.step for s in first.sessions()} == {"a": 0, "b": 4}
    # within one commit, later records of a refused session are refused too
    assert first.commit([call("a", 0, 2), call("a", 2, 3)]) == set()
    assert first.commit([call("a", 9, 10), call("a", 3, 4)]) == {"a"}
    again = reopen()
    assert again.load("a").step == 3
    assert again.load("b").step == 4  # a snapshot ahead of the calls moved it there


def test_snapshots_supersede_calls_and_deletions_end_sessions(
    store: tuple[SessionStore, Reopen],
) -> None:
    first, reopen = store
    first.commit([created("a"), created("b")])
    first.commit([call("a", 0, 2, "r1"), call("a", 2, 5, "r2"), call("b", 0, 1)])
    responses = first.load("a").responses
    kept = journal_pb2.Record()
    kept.CopyFrom(snapshot("a", 2))
    kept.snapshot.responses.extend(responses[:1])
    first.commit([kept, call("a", 5, 6, "r3"), deleted("b")])
    again = reopen()
    assert {s.session_id for s in again.sessions()} == {"a"}
    a = again.load("a")
    assert a.snapshot is not None and a.snapshot.step == 2 and a.step == 6
    assert [(c.from_step, c.to_step) for c in a.calls] == [(2, 5), (5, 6)]
    assert [r.request_id for r in a.responses] == ["r1", "r2", "r3"]
    with pytest.raises(KeyError):
        again.load("b")
    assert again.commit([call("b", 1, 2)]) == {"b"}


def test_a_second_server_cannot_open_the_directory(tmp_path: Path) -> None:
    first = DirectorySessionStore(tmp_path)
    with pytest.raises(ValueError, match="in use"):
        DirectorySessionStore(tmp_path)
    first.close()
    DirectorySessionStore(tmp_path).close()  # free again once the first lets go


def test_a_directory_that_fails_to_open_is_not_left_locked(tmp_path: Path) -> None:
    """An opening that fails after taking the lock (here: a segment that cannot be read)
    lets the lock go, so that opening it again once the cause is gone works, not "in use"."""
    unreadable = segment_path(tmp_path, 1)
    unreadable.mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as failed:
        DirectorySessionStore(tmp_path)
    unreadable.rmdir()
    DirectorySessionStore(tmp_path).close()
    assert failed.value is not None  # the failed opening's traceback is still alive here


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 3])
def test_a_record_cut_short_at_the_end_is_truncated_and_reported(tmp_path: Path, cut: int) -> None:
    store = DirectorySessionStore(tmp_path)
    store.commit([created("a"), call("a", 0, 2)])
    acknowledged = store.sizes[store.active]
    store.commit([call("a", 2, 5)])
    store.close()
    last = segments(tmp_path)[-1]
    os.truncate(last, acknowledged + cut)  # the last write was cut `cut` bytes in
    again = DirectorySessionStore(tmp_path)
    assert again.load("a").step == 2  # the torn call is not half-applied
    assert len(again.problems()) == 1 and "cut short" in again.problems()[0]
    assert last.stat().st_size == acknowledged
    assert again.commit([call("a", 2, 3)]) == set()  # and writing goes on after it
    again.close()
    assert DirectorySessionStore(tmp_path).load("a").step == 3


def crash_image(store: DirectorySessionStore, to: Path) -> Path:
    """The store's directory as a kill -9 leaves it (the files, the open store not closed)."""
    to.mkdir()
    for path in segments(store.path):
        shutil.copy(path, to / path.name)
    return to


def crash_after_a_second_write(tmp_path: Path) -> tuple[Path, int]:
    """A crash image of a store whose session `a` took steps 0-2 in one write and 2-5 in
    another, and where the first write ends."""
    store = DirectorySessionStore(tmp_path / "store")
    store.commit([created("a"), call("a", 0, 2)])
    whole = store.sizes[store.active]
    store.commit([call("a", 2, 5)])
    image = crash_image(store, tmp_path / "image")
    store.close()
    return image, whole


def test_commits_overwrite_zeros_written_ahead_instead_of_growing_the_file(
    tmp_path: Path,
) -> None:
    store = DirectorySessionStore(tmp_path / "store")
    store.commit([created("a")])
    (active,) = segments(store.path)
    size = active.stat().st_size
    written = store.sizes[store.active]
    assert size > written and not active.read_bytes()[written:].strip(b"\0")
    for step in range(20):
        store.commit([call("a", step, step + 1, f"r{step}")])
        assert store.sizes[store.active] > written
        written = store.sizes[store.active]
        assert active.stat().st_size == size  # the fdatasync has no new size to record
    image = crash_image(store, tmp_path / "image")
    store.close()
    assert active.stat().st_size == written  # a clean close cuts the zeros off
    again = DirectorySessionStore(image)  # as the crash left it: the zeros still there
    assert again.load("a").step == 20 and len(again.load("a").calls) == 20
    assert again.problems() == []  # zeros after the last record are no damage
    assert segments(image)[0].stat().st_size == written
    assert again.commit([call("a", 20, 21)]) == set()
    again.close()
    assert DirectorySessionStore(image).load("a").step == 21


def test_a_record_cut_short_before_the_zeros_is_truncated_and_reported(tmp_path: Path) -> None:
    image, whole = crash_after_a_second_write(tmp_path)
    last = segments(image)[-1]
    data = bytearray(last.read_bytes())
    tail = len(data.rstrip(b"\0")) - whole  # the last write: its record and its end
    data[whole + HEADER.size + 5 : whole + tail] = bytes(tail - HEADER.size - 5)  # torn
    last.write_bytes(bytes(data))
    again = DirectorySessionStore(image)
    assert again.load("a").step == 2
    assert len(again.problems()) == 1 and "cut short" in again.problems()[0]
    assert f"last {HEADER.size + 5} bytes written" in again.problems()[0]
    assert last.stat().st_size == whole
    again.close()


@pytest.mark.parametrize("served_ids", [False, True], ids=["short ids", "served ids"])
def test_a_flipped_byte_is_found_and_confined_to_its_session(
    tmp_path: Path, served_ids: bool
) -> None:
    """Ids of the form the server makes (32 hex digits) are looked up in the damage in one
    pass; any other form by a search of their own."""
    a, b = (new_session_id(), new_session_id()) if served_ids else ("a", "b")
    store = DirectorySessionStore(tmp_path)
    store.commit([created(a), created(b)])
    store.commit([call(a, 0, 2), call(b, 0, 1)])
    store.commit([call(a, 2, 3)])
    store.close()
    path = segments(tmp_path)[-1]
    data = bytearray(path.read_bytes())
    victim = data.find(frame(call(a, 0, 2)))
    data[victim + len(frame(call(a, 0, 2))) - 5] ^= 0x40  # in its operations, not its id
    path.write_bytes(bytes(data))
    again = DirectorySessionStore(tmp_path)
    assert any("CRC" in problem for problem in again.problems())
    summaries = {s.session_id: s for s in again.sessions()}
    assert summaries[b].error is None and again.load(b).step == 1
    error = summaries[a].error
    assert error is not None and "damaged" in error
    with pytest.raises(DataLoss, match="a record of it is damaged"):
        again.load(a)


def test_a_damaged_creation_record_makes_its_session_unloadable(tmp_path: Path) -> None:
    store = DirectorySessionStore(tmp_path)
    store.commit([created("a"), created("b")])
    store.commit([created("c")])  # damage to the last write would be a write cut short
    store.close()
    path = segments(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[data.find(frame(created("a"))) + HEADER.size + 5] ^= 0x01  # in a's creation record
    path.write_bytes(bytes(data))
    again = DirectorySessionStore(tmp_path)
    assert {s.session_id for s in again.sessions()} == {"b", "c"}  # a's id is in the damage
    assert again.problems()


def test_snapshots_and_deletions_let_the_cleaner_reclaim_segments(tmp_path: Path) -> None:
    store = DirectorySessionStore(tmp_path, segment_bytes=20_000)
    sessions = [f"s{i}" for i in range(6)]
    store.commit([created(s) for s in sessions])
    steps = dict.fromkeys(sessions, 0)
    for round_ in range(60):
        batch = []
        for s in sessions:
            batch.append(call(s, steps[s], steps[s] + 2, f"{s}-{round_}"))
            steps[s] += 2
        store.commit(batch)
        if round_ % 10 == 9:
            store.commit([snapshot(s, steps[s]) for s in sessions])
    store.commit([deleted("s0")])
    for _ in range(20):  # more traffic to give the cleaner its turns
        store.commit([call(s, steps[s], steps[s] + 1) for s in sessions[1:]])
        for s in sessions[1:]:
            steps[s] += 1
    written = 6 * 60 * len(frame(call("s1", 0, 2, "x"))) + 6 * 6 * len(frame(snapshot("s1", 1)))
    on_disk = sum(p.stat().st_size for p in segments(tmp_path))
    assert on_disk < written / 2, (on_disk, written)
    store.close()
    again = DirectorySessionStore(tmp_path, segment_bytes=20_000)
    assert {s.session_id: s.step for s in again.sessions()} == {s: steps[s] for s in sessions[1:]}
    loaded = again.load("s3")
    assert loaded.snapshot is not None and loaded.snapshot.step == 120
    assert [c.from_step for c in loaded.calls] == list(range(120, 140))
    assert again.problems() == []


def test_copies_left_by_an_interrupted_cleaning_are_read_once(tmp_path: Path) -> None:
    store = DirectorySessionStore(tmp_path)
    store.commit([created("a"), call("a", 0, 2, "r")])
    store.close()
    first = segments(tmp_path)[0]
    shutil.copy(first, tmp_path / "wal-00000007.log")  # copied forward, old one not deleted
    again = DirectorySessionStore(tmp_path)
    loaded = again.load("a")
    assert loaded.step == 2 and len(loaded.calls) == 1 and again.problems() == []


def test_redis_values_damaged_are_found_per_session(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(server.url)
        store.commit([created("a"), created("b"), call("a", 0, 2), call("b", 0, 1)])
        raw = redis.Redis(unix_socket_path=str(server.socket))
        key = "memserve:{a}:calls"
        value = raw.lindex(key, 0)
        assert isinstance(value, bytes)
        flipped = bytearray(value)
        flipped[HEADER.size + 10] ^= 0x08
        raw.lset(key, 0, bytes(flipped))  # type: ignore[arg-type]  # redis-py types it str
        with pytest.raises(DataLoss, match="CRC"):
            store.load("a")
        assert store.load("b").step == 1
        raw.lset(key, 0, value[: len(value) // 2])  # type: ignore[arg-type]  # cut short
        with pytest.raises(DataLoss, match="cut short"):
            store.load("a")


def test_redis_down_is_unavailable_and_back_is_served(tmp_path: Path) -> None:
    from serving.durable.base import StoreUnavailable

    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(server.url, timeout=2.0)
        store.commit([created("a")])
        server.kill()
        with pytest.raises(StoreUnavailable):
            store.commit([call("a", 0, 1)])
        with pytest.raises(StoreUnavailable):
            store.sessions()
        server.start()
        assert store.commit([call("a", 0, 1)]) == set()
        assert store.load("a").step == 1


def test_redis_commits_from_the_event_loop_as_from_the_thread(tmp_path: Path) -> None:
    """The commit the server makes (`commit_on_loop`, on a connection the event loop drives)
    writes and refuses what `commit` does, in the database the URL names; after a restart
    of Redis, which forgets the script, it loads it again; with Redis gone, it is
    StoreUnavailable, and once Redis is back it connects again."""
    from serving.durable.base import StoreUnavailable

    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(f"{server.url}?db=3")
        raw = redis.Redis(unix_socket_path=str(server.socket), db=3)
        assert store.commits_on_loop

        async def commits() -> list[set[str]]:
            first = await store.commit_on_loop([created("a"), call("a", 0, 2)])
            refused = await store.commit_on_loop([call("a", 1, 3), created("b")])
            raw.script_flush()
            after_flush = await store.commit_on_loop([call("a", 2, 3)])
            server.kill()
            with pytest.raises(StoreUnavailable):
                await store.commit_on_loop([call("a", 3, 4)])
            server.start()
            raw.script_flush()
            return [first, refused, after_flush, await store.commit_on_loop([call("a", 3, 5)])]

        assert asyncio.run(commits()) == [set(), {"a"}, set(), set()]
        assert [(c.from_step, c.to_step) for c in store.load("a").calls] == [(0, 2), (2, 3), (3, 5)]
        assert store.load("b").step == 0
        assert raw.exists("memserve:{a}:meta") == 1
        assert redis.Redis(unix_socket_path=str(server.socket)).dbsize() == 0  # not db 0
        store.close()


def test_redis_that_stops_answering_fails_the_commit_within_the_timeout(tmp_path: Path) -> None:
    """A Redis that accepts a commit and never answers (SIGSTOP) fails it after the store's
    timeout, StoreUnavailable, instead of holding the server; once it answers again, the
    next commit connects anew."""
    from serving.durable.base import StoreUnavailable

    with RedisServer(tmp_path) as server:
        store = RedisSessionStore(server.url, timeout=0.5)
        assert server.process is not None
        pid = server.process.pid

        async def commits() -> set[str]:
            await store.commit_on_loop([created("a")])
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreUnavailable, match=r"no reply within 0\.5 s"):
                    await store.commit_on_loop([call("a", 0, 1)])
            finally:
                os.kill(pid, signal.SIGCONT)
            return await store.commit_on_loop([created("b")])

        assert asyncio.run(commits()) == set()
        assert store.load("b").step == 0
        assert store.load("a").step in (0, 1)  # its reply was lost: it may have run
        store.close()


def test_a_command_given_up_on_is_not_sent_later(tmp_path: Path) -> None:
    """A command too large for the socket's buffers, to a Redis that stopped answering: once
    it fails (no reply within the timeout), none of the rest of it goes out, so it cannot
    land after the commands that follow it on another connection."""
    from serving.durable.base import StoreUnavailable
    from serving.durable.redis_loop import RedisLoopConnection

    with RedisServer(tmp_path) as server:
        assert server.process is not None
        pid, where = server.process.pid, {"path": str(server.socket)}

        async def scenario() -> object:
            old = await RedisLoopConnection.open(server.url, where, 5.0)
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreUnavailable, match="no reply within"):
                    await old.command(0.5, "SET", "k", bytes(32 << 20))
                assert old.transport is not None
                assert old.transport.get_write_buffer_size() == 0  # dropped, not kept to send
            finally:
                os.kill(pid, signal.SIGCONT)
            new = await RedisLoopConnection.open(server.url, where, 5.0)
            assert await new.command(5.0, "SET", "k", "new") == b"OK"
            return await new.command(5.0, "GET", "k")

        assert asyncio.run(scenario()) == b"new"


def test_redis_expires_the_sessions_of_a_cluster_not_of_a_lone_server(tmp_path: Path) -> None:
    """A cluster's replicas only forget idle sessions: Redis ends them after their TTL,
    counted from their last write. A lone server ends the sessions it expires itself, and
    writes nothing while one is in use with `--durability park`: Redis must not end it."""
    with RedisServer(tmp_path) as server:
        raw = redis.Redis(unix_socket_path=str(server.socket))
        lone, replica = RedisSessionStore(server.url), RedisSessionStore(server.url, replica="r")
        lone.commit([created("a"), call("a", 0, 1)])
        replica.commit([created("b"), call("b", 0, 1)])
        for name in ("meta", "created", "calls", "ends"):
            assert raw.pttl(f"memserve:{{a}}:{name}") == -1  # no expiry
            assert 0 < raw.pttl(f"memserve:{{b}}:{name}") <= 60_000  # created's TTL: 60 s


def test_redis_restarts_a_cluster_sessions_expiry_at_a_claim_and_a_touch(tmp_path: Path) -> None:
    """A replica that brings a session back (claim) or serves a call on it that nothing
    has written for a while (touch) restarts its expiry, every key of it; a lone server's
    keys stay without one, and a touch of a session Redis does not hold makes nothing."""
    with RedisServer(tmp_path) as server:
        raw = redis.Redis(unix_socket_path=str(server.socket))
        lone, replica = RedisSessionStore(server.url), RedisSessionStore(server.url, replica="r")
        lone.commit([created("a"), call("a", 0, 1)])
        replica.commit([created("b"), call("b", 0, 1)])
        names = ("meta", "created", "calls", "ends")
        for restart in ("claim", "touch"):
            for name in names:
                raw.pexpire(f"memserve:{{b}}:{name}", 1_000)  # as if 59 s had passed
            if restart == "claim":
                replica.claim("b")
            else:
                replica.touch(["a", "b", "c"])
            for name in names:
                assert raw.pttl(f"memserve:{{a}}:{name}") == -1
                assert 1_000 < raw.pttl(f"memserve:{{b}}:{name}") <= 60_000
        assert raw.keys("memserve:{c}:*") == []
        assert replica.owner("b") == (1, "r")


def test_redis_takes_a_snapshot_only_from_the_sessions_owner(tmp_path: Path) -> None:
    """Replica a's call is refused (b advanced the session); a's snapshot of the state that
    call left must be refused too. Were it taken, it would stand in for b's step: that step
    lost, a's refused one kept, silently (the steps still add up)."""
    with RedisServer(tmp_path) as server:
        a = RedisSessionStore(server.url, replica="a")
        b = RedisSessionStore(server.url, replica="b")
        assert a.commit([created("s"), call("s", 0, 2)]) == set()
        assert b.claim("s") == 2  # b brought it back (a's client retried there)
        assert b.commit([call("s", 2, 3)]) == set()
        assert a.commit([call("s", 2, 4)]) == {"s"}  # a, late, is refused
        assert a.commit([snapshot("s", 4)]) == {"s"}  # and so is its state in whole
        assert a.owner("s") == (3, "b")
        stored = a.load("s")
        assert stored.step == 3 and stored.snapshot is None
        assert [(c.from_step, c.to_step) for c in stored.calls] == [(0, 2), (2, 3)]
        assert b.commit([snapshot("s", 3)]) == set()  # the owner's is taken
        assert a.load("s").snapshot.step == 3  # type: ignore[union-attr]


def test_a_header_cut_short_before_the_zeros_is_a_record_cut_short(tmp_path: Path) -> None:
    """A crash that left only a record's MAGIC before the zeros: its length and CRC read as
    0, which must not pass for an empty record kept at every opening."""
    image, whole = crash_after_a_second_write(tmp_path)
    last = segments(image)[-1]
    data = bytearray(last.read_bytes())
    data[whole + 4 :] = bytes(len(data) - whole - 4)  # MAGIC alone reached the disk
    last.write_bytes(bytes(data))
    again = DirectorySessionStore(image)
    assert again.load("a").step == 2
    assert len(again.problems()) == 1 and "cut short" in again.problems()[0]
    assert last.stat().st_size == whole
    again.close()


class FailingDisk:
    """os.fdatasync and os.pwrite of the `dir:` store, made to fail on demand."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.syncs_to_fail = 0
        self.clearing_fails = False
        real_sync, real_pwrite = os.fdatasync, os.pwrite

        def fdatasync(fd: int) -> None:
            if self.syncs_to_fail:
                self.syncs_to_fail -= 1
                raise OSError(5, "Input/output error")
            real_sync(fd)

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if self.clearing_fails and data and not any(data):  # zeros over a failed write
                raise OSError(5, "Input/output error")
            return real_pwrite(fd, data, offset)

        patch.setattr("serving.durable.directory.os.fdatasync", fdatasync)
        patch.setattr("serving.durable.directory.os.pwrite", pwrite)


def test_a_failed_write_that_cannot_be_cleared_stops_writes_until_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose fdatasync failed (its bytes may be on the disk all the same) and whose
    clearing failed too: no later write goes in until it is cleared, or a shorter one would
    leave a stale, never acknowledged record after it for a recovery to apply."""
    from serving.durable.base import StoreUnavailable

    store = DirectorySessionStore(tmp_path / "store")
    store.commit([created("a"), created("b")])
    disk = FailingDisk(monkeypatch)
    disk.syncs_to_fail, disk.clearing_fails = 1, True
    stale = call("b", 0, 1, "x")  # after a's record: at a frame boundary once b's is shorter
    with pytest.raises(StoreUnavailable):
        store.commit([call("a", 0, 1), stale])
    good = call("b", 0, 1)
    with pytest.raises(StoreUnavailable):
        store.commit([good])  # the failed write is still there: nothing is written
    with pytest.raises(StoreUnavailable):
        store.probe()  # nor is the store healthy
    disk.clearing_fails = False
    store.probe()  # clears it
    assert store.commit([good]) == set()
    image = crash_image(store, tmp_path / "image")
    store.close()
    again = DirectorySessionStore(image)
    assert again.problems() == []
    assert again.load("b").calls == [good.call] and again.load("a").step == 0
    again.close()


def test_a_new_segment_that_cannot_be_made_neither_fails_the_commit_nor_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records that fill a segment are durable before the next segment is made: if it
    cannot be (too many open files), the commit still succeeds, the segment grows, and the
    next write makes the new one."""
    store = DirectorySessionStore(tmp_path / "store", segment_bytes=4096)
    store.commit([created("a")])
    real_open = os.open
    refusing = True

    def open_(path: str | os.PathLike[str], *args: int) -> int:
        if refusing and str(path).endswith(".log"):
            raise OSError(24, "Too many open files")
        return real_open(path, *args)

    monkeypatch.setattr("serving.durable.directory.os.open", open_)
    step, first = 0, store.active
    while store.sizes[first] < 2 * 4096:
        assert store.commit([call("a", step, step + 5)]) == set()
        step += 5
    assert store.active == first
    refusing = False
    assert store.commit([call("a", step, step + 1)]) == set()
    assert store.active == first + 1
    assert store.commit([call("a", step + 1, step + 2)]) == set()
    store.close()
    again = DirectorySessionStore(tmp_path / "store")
    assert again.problems() == [] and again.load("a").step == step + 2
    again.close()


def test_a_new_segment_begun_in_vain_does_not_hide_the_tear_of_the_last_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new segment whose first bytes cannot be written (a full disk) is removed, and
    writes go on in the one before. Were its empty file left (a crash before the removal
    reached the disk), the segment written to last would not be the last file; a write torn
    there is still dropped whole, never read record by record."""
    store = DirectorySessionStore(tmp_path / "store", segment_bytes=4096)
    store.commit([created("a"), created("b")])
    real_write = os.write

    def full_disk(descriptor: int, data: bytes) -> int:
        if data == SEGMENT_START:
            raise OSError(28, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr("serving.durable.appender.os.write", full_disk)
    step, first = 0, store.active
    while store.sizes[first] < 4096:
        assert store.commit([call("a", step, step + 5)]) == set()
        step += 5
    assert store.active == first
    assert segments(store.path) == [segment_path(store.path, first)]  # none left behind
    acknowledged = store.sizes[first]
    torn = [call("a", step, step + 1), call("b", 0, 1)]
    store.commit(torn)
    image = crash_image(store, tmp_path / "image")
    store.close()
    monkeypatch.undo()  # the disk has room again
    written = segments(image)[-1]
    segment_path(image, first + 1).touch()  # as if its removal had not reached the disk
    with open(written, "r+b") as file:  # the crash cut the write inside its second record
        file.truncate(acknowledged + len(frame(torn[0])) + 10)
    again = DirectorySessionStore(image)
    summaries = {s.session_id: (s.step, s.error) for s in again.sessions()}
    assert summaries == {"a": (step, None), "b": (0, None)}  # a's record is not applied
    assert len(again.problems()) == 1 and "cut short" in again.problems()[0]
    again.close()


@pytest.mark.parametrize("lost", ["first", "middle"])
def test_a_write_of_several_records_torn_by_a_power_loss_is_dropped_whole(
    tmp_path: Path, lost: str
) -> None:
    """A crash of the machine: the pages of the last write reach the disk in any order, so
    one of its records may be zeros while a later one is whole. That write was never
    acknowledged: it is dropped whole (not read as damage that would fail its sessions,
    nor its whole records applied), whoever its records were of."""
    store = DirectorySessionStore(tmp_path / "store")
    store.commit([created("a"), created("b")])
    store.commit([call("a", 0, 1), call("b", 0, 1)])
    acknowledged = store.sizes[store.active]
    torn = [call("a", 1, 2), call("b", 1, 3), call("a", 2, 4)]
    store.commit(torn)
    image = crash_image(store, tmp_path / "image")
    store.close()
    last = segments(image)[-1]
    data = bytearray(last.read_bytes())
    start = acknowledged + (0 if lost == "first" else len(frame(torn[0])))
    data[start + 20 : start + len(frame(torn[1]))] = bytes(len(frame(torn[1])) - 20)
    last.write_bytes(bytes(data))
    again = DirectorySessionStore(image)
    summaries = {s.session_id: s for s in again.sessions()}
    assert {k: (s.step, s.error) for k, s in summaries.items()} == {"a": (1, None), "b": (1, None)}
    assert len(again.problems()) == 1 and "cut short" in again.problems()[0]
    assert last.stat().st_size == acknowledged
    assert again.commit([call("b", 1, 2)]) == set()  # and writing goes on after it
    again.close()
    assert DirectorySessionStore(image).load("b").step == 2


def test_a_segment_of_the_older_format_still_opens(tmp_path: Path) -> None:
    """Segments written before writes ended with `Written` records: records alone."""
    records = [created("a"), call("a", 0, 2), call("a", 2, 3, "r")]
    (tmp_path / "wal-00000001.log").write_bytes(b"".join(frame(r) for r in records))
    store = DirectorySessionStore(tmp_path)
    assert store.problems() == [] and store.load("a").step == 3
    assert [r.request_id for r in store.load("a").responses] == ["r"]
    store.close()

"""The committer, the one writer of a session store, over a real `dir:` store: commits
queued while it writes go out together in one write, in order; a write that fails fails its
calls and marks the store down (new commits fail at once) while loads still run, and the
store is served again once it answers."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from serving.durable.base import StoreUnavailable
from serving.durable.committer import Committer
from serving.durable.directory import DirectorySessionStore
from tests.serving.test_stores import created


def test_commits_queued_during_a_write_are_written_together_in_order(tmp_path: Path) -> None:
    store = DirectorySessionStore(tmp_path / "store")
    writes: list[list[str]] = []
    writing, gate = threading.Event(), threading.Event()
    write = store.commit

    def gated(records: Any) -> set[str]:  # in the writer's thread
        writes.append([r.created.session_id for r in records])
        writing.set()
        gate.wait()
        return write(records)

    store.commit = gated  # type: ignore[method-assign]

    async def scenario() -> None:
        committer = Committer(store)
        committer.start()
        try:
            first = committer.commit([created("a" * 32)])
            assert await asyncio.to_thread(writing.wait, 60)
            later = [committer.commit([created(c * 32)]) for c in "bcd"]
            gate.set()
            assert await first == set() and await asyncio.gather(*later) == [set()] * 3
            assert writes == [["a" * 32], ["b" * 32, "c" * 32, "d" * 32]]
            assert committer.commits == 2
        finally:
            gate.set()
            await committer.stop()

    asyncio.run(scenario())


def test_a_failed_write_marks_the_store_down_until_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.durable.committer.PROBE_SECONDS", 0.01)
    store = DirectorySessionStore(tmp_path / "store")
    down = threading.Event()
    write, probe = store.commit, store.probe

    def failing(records: Any) -> set[str]:
        if down.is_set():
            raise OSError("disk gone")
        return write(records)

    def probing() -> None:
        if down.is_set():
            raise OSError("disk gone")
        probe()

    store.commit = failing  # type: ignore[method-assign]
    store.probe = probing  # type: ignore[method-assign]

    async def scenario() -> None:
        committer = Committer(store)
        heard: list[tuple[bool, str]] = []
        changed = asyncio.Event()

        def on_health(healthy: bool, why: str) -> None:
            heard.append((healthy, why))
            changed.set()

        committer.on_health = on_health
        committer.start()
        try:
            assert await committer.commit([created("a" * 32)]) == set()
            down.set()
            with pytest.raises(StoreUnavailable, match="disk gone"):
                await committer.commit([created("b" * 32)])
            await changed.wait()
            changed.clear()
            assert heard == [(False, "the session store failed: disk gone")]
            assert not committer.healthy
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await committer.commit([created("c" * 32)])  # refused at once
            assert (await committer.run(store.load, "a" * 32)).step == 0  # loads still run
            down.clear()
            await changed.wait()
            assert heard[-1] == (True, "") and committer.healthy
            assert await committer.commit([created("d" * 32)]) == set()
            assert {s.session_id for s in store.sessions()} == {"a" * 32, "d" * 32}
        finally:
            down.clear()
            await committer.stop()

    asyncio.run(scenario())

"""Group commit: records from every launch and lifecycle call go to the store in order, as
few writes as possible, from a thread of its own so the event loop never waits on a disk
(a store that is a network round trip away, Redis, is waited on by the loop itself:
`SessionStore.commits_on_loop`).

Whatever waits when the writer is free is committed together: at least one write per
launch's worth of records, fewer under load (the next launch's records gather while one
write is in progress). With an `interval`, the writer waits that long between writes
instead (`--durability interval`). If a write fails the store is marked unhealthy and probed
until it answers again; `on_health` hears of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from protos import journal_pb2
from serving.durable.base import SessionStore, StoreUnavailable, record_session
from serving.metrics import Metrics

log = logging.getLogger("memserve.store")

T = TypeVar("T")
PROBE_SECONDS = 0.5


@dataclass(frozen=True)
class Durability:
    """Where an engine commits its sessions (None: nowhere, `--store memory`), how
    (`--durability`), and how many steps a session may run between snapshots."""

    committer: Committer | None = None
    mode: str = "launch"
    snapshot_every: int = 1024
    replica: str = ""  # one replica of a cluster sharing the store ("": a lone server)


class Committer:
    """The one writer of a session store."""

    def __init__(
        self, store: SessionStore, interval: float | None = None, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.interval = interval
        kind = type(store).__name__.removesuffix("SessionStore").lower()
        metrics = metrics or Metrics()
        self.observe_seconds = metrics.store_commit_duration.labels(kind).observe
        self.observe_records = metrics.store_commit_records.labels(kind).observe
        self.up = metrics.store_up.labels(kind)
        self.up.set(1)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="memserve-store")
        self.waiting: list[tuple[list[journal_pb2.Record], asyncio.Future[set[str]]]] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.healthy = True
        self.on_health: Callable[[bool, str], None] = lambda healthy, why: None
        self.commits = 0  # writes made (for tests and the drain's log line)

    def start(self) -> None:
        self.task = asyncio.create_task(self._write_loop(), name="store-writer")

    def commit(self, records: Sequence[journal_pb2.Record]) -> asyncio.Future[set[str]]:
        """Queue `records`; the future resolves, once they are written, with the ids of
        their sessions the store refused, or fails with StoreUnavailable."""
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        if not self.healthy:  # fail fast while the store is down; the probe watches it
            future.set_exception(StoreUnavailable("the session store is unavailable"))
            return future
        self.waiting.append((list(records), future))
        self.wake.set()
        return future

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run another store operation (a load) in the writer's thread, between writes."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def flush(self) -> bool:
        """Return once everything queued before is written (True) or has failed (False)."""
        try:
            await self.commit([])
        except StoreUnavailable:
            return False
        return True

    async def stop(self) -> bool:
        """Write what is queued and close the store; whether that was all written."""
        written = await self.flush()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)
        self.store.close()
        return written

    async def _write_loop(self) -> None:
        while True:
            await self.wake.wait()
            if self.interval is not None:
                await asyncio.sleep(self.interval)
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            records = [record for records, _ in batch for record in records]
            started = time.perf_counter()
            try:
                refused = await self._write(records)
            except Exception as error:
                failure = (
                    error
                    if isinstance(error, StoreUnavailable)
                    else StoreUnavailable(f"the session store failed: {error}")
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                await self._until_healthy(failure)
                continue
            if records:
                self.observe_seconds(time.perf_counter() - started)
                self.observe_records(len(records))
            self.commits += 1
            for records, future in batch:
                if not future.done():
                    future.set_result(refused & {record_session(r) for r in records})

    async def _write(self, records: list[journal_pb2.Record]) -> set[str]:
        if not records:
            return set()
        if self.store.commits_on_loop:
            return await self.store.commit_on_loop(records)
        return await self.run(self.store.commit, records)

    async def _until_healthy(self, failure: StoreUnavailable) -> None:
        """Mark the store unhealthy, then probe it until it answers."""
        self.healthy = False
        self.up.set(0)
        log.error(str(failure), extra={"event": "store_unavailable"})
        self.on_health(False, str(failure))
        for _, future in self.waiting:
            if not future.done():
                future.set_exception(failure)
        self.waiting = []
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                await self.run(self.store.probe)
                if self.store.commits_on_loop:
                    await self.store.probe_on_loop()
            except Exception as error:
                log.debug("store still unavailable: %s", error)
                continue
            self.healthy = True
            self.up.set(1)
            log.info("session store available again", extra={"event": "store_available"})
            self.on_health(True, "")
            return

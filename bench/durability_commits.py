"""Part 2 of bench/durability.py: what one commit costs. write + fdatasync of appends of a
launch's size on the store's disk, and of writes of that size into zeros written ahead (as
the `dir:` store writes them); a Redis round trip (PING, and a SET, which `appendfsync
always` syncs); each store's own `commit` of one launch's call records (Redis also with
`appendfsync no`, which tells its fsync apart). Every figure is a distribution of single
timings (p50, p90, p99, max), records built outside the timing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from bench.durability_servers import CONCURRENCY, Settings, scratch_directory
from bench.durability_throughput import SHAPES
from bench.redis_server import RedisServer
from bench.serving import MODEL

if TYPE_CHECKING:
    from serving.durable.base import SessionStore

APPEND_SIZES = (128, 4096, 65536, 262144)  # bytes per fdatasync: a call .. a T=20 launch
ZEROED_REGION = 64 << 20  # the file the writes into zeros go round


def summary_us(samples: list[float]) -> dict[str, float]:
    """Median, p90, p99 and max of durations in seconds, in microseconds."""
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e6

    return {
        "samples": len(ordered),
        "p50_us": statistics.median(ordered) * 1e6,
        "p90_us": at(0.9),
        "p99_us": at(0.99),
        "max_us": ordered[-1] * 1e6,
    }


def timed(
    action: Callable[[], object], budget: float, least: int = 20, most: int = 5000
) -> list[float]:
    """Durations of `action()`, repeated for `budget` seconds (at least `least` times)."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < least or (time.perf_counter() < deadline and len(samples) < most):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def time_appends(directory: Path, budget: float, ahead: bool = False) -> list[dict[str, Any]]:
    """write + fdatasync of an append of each size to a file in `directory`; with `ahead`,
    into a file already that long (zeros written and synced first, as the `dir:` store
    writes them ahead of its records), so that no fdatasync has a new file size to record."""
    path = directory / "appends.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    rows = []
    try:
        if ahead:
            zeros = bytes(1 << 20)
            for at in range(0, ZEROED_REGION, len(zeros)):
                os.pwrite(descriptor, zeros, at)
            os.fsync(descriptor)
        for size in APPEND_SIZES:
            data = os.urandom(size)
            end = [0]  # where the next write starts: wraps around the zeroed region

            def append(data: bytes = data, end: list[int] = end) -> None:
                if ahead and end[0] + len(data) > ZEROED_REGION:
                    end[0] = 0
                os.pwrite(descriptor, data, end[0])
                end[0] += len(data)
                os.fdatasync(descriptor)

            if not ahead:
                end[0] = os.fstat(descriptor).st_size
            rows.append({"bytes": size, **summary_us(timed(append, budget))})
    finally:
        os.close(descriptor)
        path.unlink()
    return rows


def call_records(session_ids: list[str], steps: int, start: int, input_size: int) -> list[Any]:
    """One launch's records: a call of `steps` ntm-copy-like input rows per session, from
    step `start` (as serving/journal.py builds them, without a request id)."""
    from protos import journal_pb2
    from serving.durable.records import operation_record
    from serving.protocol import Operation

    rng = np.random.default_rng(start)
    records = []
    for session_id in session_ids:
        rows = (rng.random((steps, input_size)) > 0.5).astype(np.float32)
        call = journal_pb2.CallCommitted(
            session_id=session_id,
            from_step=start,
            to_step=start + steps,
            operations=[operation_record(Operation.STEP, row) for row in rows],
        )
        records.append(journal_pb2.Record(call=call))
    return records


def created_records(session_ids: list[str]) -> list[Any]:
    from protos import journal_pb2

    return [
        journal_pb2.Record(
            created=journal_pb2.SessionCreated(
                session_id=session_id,
                model=MODEL,
                weights_digest="0" * 64,
                ttl_seconds=600.0,
                unix_time=time.time(),
            )
        )
        for session_id in session_ids
    ]


def time_store_commits(store: SessionStore, budget: float, input_size: int) -> list[dict[str, Any]]:
    """`store.commit` of one launch's call records, for each shape's launch and for a
    launch of one T=1 call: its sessions created first, then launches one after the other,
    each from the step the last one ended at (records built outside the timing)."""
    from serving.durable.records import frame

    launches = [("one_call_t1", 1, 1)]
    launches += [(shape.name, c, shape.steps) for shape, c in zip(SHAPES, CONCURRENCY, strict=True)]
    rows = []
    for name, sessions, steps in launches:
        ids = [secrets.token_hex(16) for _ in range(sessions)]
        assert not store.commit(created_records(ids))
        samples: list[float] = []
        size = 0
        deadline = time.perf_counter() + budget
        while len(samples) < 10 or (time.perf_counter() < deadline and len(samples) < 2000):
            records = call_records(ids, steps, len(samples) * steps, input_size)
            size = sum(len(frame(record)) for record in records)
            start = time.perf_counter()
            refused = store.commit(records)
            samples.append(time.perf_counter() - start)
            assert not refused, refused
        rows.append(
            {
                "launch": name,
                "sessions": sessions,
                "steps_per_call": steps,
                "bytes": size,
                **summary_us(samples),
            }
        )
    return rows


def measure_commit_costs(settings: Settings, work: Path, input_size: int) -> dict[str, Any]:
    """What one commit costs: the disk's fdatasync, a Redis round trip, each store's commit."""
    from serving.durable.directory import DirectorySessionStore
    from serving.durable.redis_store import RedisSessionStore

    budget = settings.commit_seconds
    result: dict[str, Any] = {"appends": time_appends(Path(settings.store_dir), budget)}
    print(f"fdatasync appends: {[round(r['p50_us']) for r in result['appends']]} us (p50)")
    result["writes_into_zeros"] = time_appends(Path(settings.store_dir), budget, ahead=True)
    print(f"fdatasync writes into zeros: "
          f"{[round(r['p50_us']) for r in result['writes_into_zeros']]} us (p50)")  # fmt: skip

    with contextlib.ExitStack() as stack:
        store = DirectorySessionStore(scratch_directory(stack, settings, "commit"))
        stack.callback(store.close)  # before its directory goes
        result["dir_commit"] = time_store_commits(store, budget, input_size)
    print(f"dir: commit: {p50s(result['dir_commit'])} us (p50)")

    result["redis"] = {}
    for appendfsync in ("always", "no"):
        with RedisServer(work / f"redis-commit-{appendfsync}", appendfsync) as server:
            client = redis.Redis(unix_socket_path=str(server.socket))
            redis_store = RedisSessionStore(server.url)
            try:
                costs: dict[str, Any] = {
                    "ping": summary_us(timed(client.ping, budget)),
                    "set_100_bytes": summary_us(
                        timed(partial(client.set, "k", bytes(100)), budget)
                    ),
                    "commit": time_store_commits(redis_store, budget, input_size),
                }
                result["redis"][appendfsync] = costs
            finally:
                redis_store.close()
                client.close()
        print(
            f"redis appendfsync {appendfsync}: ping {costs['ping']['p50_us']:.0f} us, set "
            f"{costs['set_100_bytes']['p50_us']:.0f} us, commit {p50s(costs['commit'])} us (p50)"
        )
    return result


def p50s(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(row["launch"], round(row["p50_us"])) for row in rows]

"""Benchmark of durable sessions: what committing every call costs a server, what one commit
costs, how many bytes a step logs, and how fast a killed server comes back on its store.

1. Throughput. `memserve serve --models ntm-copy` (PyTorch reference kernels, default
   settings, as bench/serving.py) on five stores, all running for the whole benchmark:
   `memory` (the reference), `dir:` (a temporary directory under `--store-dir`; the record
   says whether that is the repository's disk) and `redis://` (a real redis-server on a
   Unix socket, `appendonly yes`, `appendfsync always`: bench/redis_server.py), each of the
   last two with `--durability launch` and `interval`. Two call shapes: unary Step with T=1
   at C=64 and with T=20 at C=256, each level measured by bench/serving.py's `measure_level`
   (the load generator's closed loop, recorder and scraper), on sessions left to expire
   after their level rather than deleted (`ExpiringCalls` says why). Each of `--rounds`
   rounds measures every (shape, store) back to back, the
   stores in one order in odd rounds and in the reverse order in even ones; a store's
   session-steps/s is divided by `memory`'s of the same round and shape, and the targets
   are decided on the median of those per-round ratios.
2. Commit cost. write + fdatasync of appends of a launch's size on the store's disk; a
   redis round trip (PING, and a SET, which `appendfsync always` syncs); each store's own
   `commit` of one launch's call records (Redis also with `appendfsync no`, which tells its
   fsync apart).
3. Bytes. A state snapshot against one step's logged command (its framed record), for each
   bundled model: the numbers behind command logging with periodic snapshots.
4. Recovery. `--sessions` sessions with `--calls-per-session` Step calls (T=1) each, on
   `dir:` and on `redis://` (`--durability launch`); kill -9 of the server; a new server on
   the same store: (a) its process's start to its "serving" log line (every session known:
   the store's index read), (b) the first call on every session, `--recovery-concurrency`
   at a time (each brings its session's state back: the calls replayed in the model
   process). The target is judged on (a): see `recovery_verdict`.

It prints what each level measured as it goes, a table last, and writes every round's
numbers as JSON (default bench/results/durability-cpu.json).

    python bench/durability.py                 # the full run (how long: docs/performance.md)
    python bench/durability.py --rounds 1 --seconds 2 --sessions 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose serving.py is not serving/

import redis  # noqa: E402

from bench.child_server import ChildServer  # noqa: E402
from bench.redis_server import RedisServer  # noqa: E402
from bench.serving import (  # noqa: E402
    MODEL,
    LevelRow,
    Shape,
    StepCalls,
    measure_level,
    median_of,
    median_verdict,
    print_level,
    provenance,
    quotient,
    server_command,
    verdict,
    write_record,
)
from clients.loadgen import server_metrics  # noqa: E402
from clients.loadgen.recording import Latencies  # noqa: E402
from clients.loadgen.schedule import Session  # noqa: E402
from protos import memserve_pb2  # noqa: E402

SHAPES = (Shape("unary_t1", "Step", 1), Shape("unary_t20", "Step", 20))
CONCURRENCY = (64, 256)  # C of each shape (the issue's)
# The issue's targets: throughput as a fraction of `memory`'s, recovery in seconds.
TARGETS = {"dir-launch": 0.85, "redis-launch": 0.7}
RECOVERY_SECONDS = 10.0
SESSION_TTL = 3600.0  # recovery sessions outlive a slow fill
STALL_SECONDS = 60.0  # recovery: no answer for this long and the server is taken as hung
APPEND_SIZES = (128, 4096, 65536, 262144)  # bytes per fdatasync: a call .. a T=20 launch


@dataclass(frozen=True)
class StoreConfig:
    """One server of the throughput part: its store and its `--durability`."""

    name: str
    store: str  # memory, dir, redis
    durability: str  # none (memory), launch, interval


CONFIGS = (
    StoreConfig("memory", "memory", "none"),
    StoreConfig("dir-launch", "dir", "launch"),
    StoreConfig("dir-interval", "dir", "interval"),
    StoreConfig("redis-launch", "redis", "launch"),
    StoreConfig("redis-interval", "redis", "interval"),
)


@dataclass
class Settings:
    seconds: float
    warmup: float
    rounds: int
    channels: int
    sessions: int  # recovery
    calls_per_session: int
    recovery_concurrency: int
    recovery_slots: int  # the recovery server's --slots
    commit_seconds: float  # timing budget per commit-cost measurement
    parts: list[str]
    store_dir: str  # where dir: stores and the fdatasync test go
    concurrency: list[int] = field(default_factory=lambda: list(CONCURRENCY))  # per shape
    level_ttl: float = 5.0  # throughput sessions expire this long after their level
    server_env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- processes


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_write_bytes(pid: int) -> int:
    """Bytes a process has caused to be sent to the storage layer (/proc/PID/io)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class StoreReading:
    """A durable server's store at one moment: the store process's CPU seconds, the bytes
    the process that writes the store sent to the disk, and Redis's own count of commit
    scripts run and their time (0 for dir:)."""

    cpu: float
    disk_bytes: int
    scripts: int
    script_usec: int


class DurableServer(ChildServer):
    """`memserve serve` on one store. `measure_level` reads `cpu_seconds` when a level's
    window opens and when it closes; here that also takes a `StoreReading`, so that the
    redis-server's CPU counts as the server's (a durable call costs it too) and the store's
    own work over the window is known."""

    def __init__(
        self,
        config: StoreConfig,
        log_dir: Path,
        url: str,
        redis_server: RedisServer | None,
        env: dict[str, str],
        extra: Sequence[str] = (),
    ) -> None:
        command = [*server_command(True), *extra]
        if config.store != "memory":
            command += ["--store", url, "--durability", config.durability]
        super().__init__(command, log_dir, name=config.name, env=env)
        self.config = config
        self.url = url
        self.redis_server = redis_server
        self.redis = (
            redis.Redis(unix_socket_path=str(redis_server.socket))
            if redis_server is not None
            else None
        )
        self.readings: list[StoreReading] = []

    def store_reading(self) -> StoreReading:
        if self.redis_server is None or self.redis_server.process is None:
            writer = self.pid if self.config.store == "dir" else 0
            return StoreReading(0.0, disk_write_bytes(writer) if writer else 0, 0, 0)
        assert self.redis is not None
        pid = self.redis_server.process.pid
        stats: dict[str, Any] = self.redis.info("commandstats").get("cmdstat_evalsha", {})
        return StoreReading(
            process_cpu_seconds(pid),
            disk_write_bytes(pid),
            int(stats.get("calls", 0)),
            int(stats.get("usec", 0)),
        )

    def cpu_seconds(self) -> float:
        reading = self.store_reading()
        self.readings.append(reading)
        return super().cpu_seconds() + reading.cpu

    def window_store(self) -> dict[str, float]:
        """The store's work between the last two readings (a level's window)."""
        before, after = self.readings[-2], self.readings[-1]
        scripts = after.scripts - before.scripts
        return {
            "store_cpu_seconds": after.cpu - before.cpu,
            "disk_write_bytes": after.disk_bytes - before.disk_bytes,
            "redis_commits": scripts,
            "redis_commit_mean_us": (after.script_usec - before.script_usec) / scripts
            if scripts
            else 0.0,
        }

    def stop(self) -> int | None:
        if self.redis is not None:
            self.redis.close()
        return super().stop()


def store_url(kind: str, directory: Path, redis_server: RedisServer | None) -> str:
    if kind == "dir":
        return f"dir:{directory}"
    if kind == "redis":
        assert redis_server is not None
        return redis_server.url
    return "memory"


# ---------------------------------------------------------------------------- throughput


@dataclass
class StoreLevel:
    """One (round, shape, store) level: what the client measured, and the store's work."""

    config: str
    store: str
    durability: str
    row: LevelRow
    store_work: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "store": self.store,
            "durability": self.durability,
            **asdict(self.row),
            "ok": self.row.ok,
            **self.store_work,
        }


class ExpiringCalls(StepCalls):
    """bench/serving.py's Step calls, on sessions that are left to expire when their level
    ends instead of being deleted. A DeleteSession on a durable server holds the engine's
    lock until its deletion is committed (serving/lifecycle.py: `delete`), so each one stalls
    every launch for a commit and deletions run one at a time: with `interval`, 1 s each, and
    the 256 of a level took over 4 minutes. Expiry commits its deletions in the background."""

    ttl = 5.0

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(model=MODEL, ttl_seconds=self.ttl)

    async def release(self, session: Session) -> None:
        await super().release(session)
        session.gone = True  # the closed loop deletes no session marked gone


async def settle(server: DurableServer, timeout: float = 60.0) -> None:
    """Wait until the server holds no session (the last level's have expired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = await asyncio.to_thread(server_metrics.scrape, server.metrics_url)
        if server_metrics.total(samples, "memserve_sessions") == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} still holds sessions {timeout:g} s after its level")


async def measure_throughput(
    settings: Settings, servers: list[DurableServer], input_size: int, output_size: int
) -> list[StoreLevel]:
    """Every round: each shape on every server back to back, in alternating order."""

    class Calls(ExpiringCalls):
        ttl = settings.level_ttl

    levels: list[StoreLevel] = []
    for round_ in range(1, settings.rounds + 1):
        order = servers if round_ % 2 else servers[::-1]
        for shape, concurrency in zip(SHAPES, settings.concurrency, strict=True):
            for server in order:
                await settle(server)
                row = await measure_level(
                    server,
                    server.config.name,
                    shape,
                    concurrency,
                    settings,
                    input_size,
                    output_size,
                    round_,
                    Calls,
                )
                level = StoreLevel(
                    server.config.name,
                    server.config.store,
                    server.config.durability,
                    row,
                    server.window_store(),
                )
                levels.append(level)
                print_level(row)
    return levels


def find_level(levels: list[StoreLevel], config: str, shape: str, round_: int) -> StoreLevel:
    return next(
        level
        for level in levels
        if (level.config, level.row.shape, level.row.round) == (config, shape, round_)
    )


def round_ratios(levels: list[StoreLevel], rounds: int) -> list[dict[str, dict[str, float]]]:
    """Per round: every store's session-steps/s over `memory`'s, by shape."""
    ratios = []
    for round_ in range(1, rounds + 1):
        by_config: dict[str, dict[str, float]] = {}
        for config in CONFIGS:
            by_config[config.name] = {
                shape.name: quotient(
                    find_level(levels, config.name, shape.name, round_).row.session_steps_per_s,
                    find_level(levels, "memory", shape.name, round_).row.session_steps_per_s,
                )
                for shape in SHAPES
            }
        ratios.append(by_config)
    return ratios


def throughput_targets(
    levels: list[StoreLevel], ratios: list[dict[str, dict[str, float]]]
) -> dict[str, Any]:
    """Each target store against `memory`, per shape, decided on the median of the rounds'
    ratios; a store passes when both shapes do. Levels with errors fail."""
    targets: dict[str, Any] = {}
    for config, threshold in TARGETS.items():
        shapes = {}
        for shape in SHAPES:
            compared = [
                level
                for level in levels
                if level.row.shape == shape.name and level.config in (config, "memory")
            ]
            shapes[shape.name] = median_verdict(
                threshold,
                [by_config[config][shape.name] for by_config in ratios],
                all(level.row.ok for level in compared),
            )
        targets[config] = {
            "threshold": threshold,
            "shapes": shapes,
            "pass": all(result["pass"] for result in shapes.values()),
        }
    return targets


# ---------------------------------------------------------------------------- commit cost


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


def timed(action: Any, budget: float, least: int = 20, most: int = 5000) -> list[float]:
    """Durations of `action()`, repeated for `budget` seconds (at least `least` times)."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < least or (time.perf_counter() < deadline and len(samples) < most):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def time_appends(directory: Path, budget: float) -> list[dict[str, Any]]:
    """write + fdatasync of an append of each size to a file in `directory`."""
    path = directory / "appends.log"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rows = []
    try:
        for size in APPEND_SIZES:
            data = os.urandom(size)

            def append(data: bytes = data) -> None:
                os.write(descriptor, data)
                os.fdatasync(descriptor)

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


def time_store_commits(store: Any, budget: float, input_size: int) -> list[dict[str, Any]]:
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
    disk = Path(settings.store_dir)
    result: dict[str, Any] = {"appends": time_appends(disk, budget)}
    print(f"fdatasync appends: {[round(r['p50_us']) for r in result['appends']]} us (p50)")

    directory = Path(tempfile.mkdtemp(prefix="bench-durability-commit-", dir=disk))
    store = DirectorySessionStore(directory)
    try:
        result["dir_commit"] = time_store_commits(store, budget, input_size)
    finally:
        store.close()
        remove_tree(directory)

    result["redis"] = {}
    for appendfsync in ("always", "no"):
        with RedisServer(work / f"redis-commit-{appendfsync}", appendfsync) as server:
            client = redis.Redis(unix_socket_path=str(server.socket))
            redis_store = RedisSessionStore(server.url)
            try:
                result["redis"][appendfsync] = {
                    "ping": summary_us(timed(client.ping, budget)),
                    "set_100_bytes": summary_us(
                        timed(partial(client.set, "k", bytes(100)), budget)
                    ),
                    "commit": time_store_commits(redis_store, budget, input_size),
                }
            finally:
                redis_store.close()
                client.close()
    for kind in ("dir_commit",):
        print(f"{kind}: {[(r['launch'], round(r['p50_us'])) for r in result[kind]]} us (p50)")
    for appendfsync, costs in result["redis"].items():
        commits = [(r["launch"], round(r["p50_us"])) for r in costs["commit"]]
        print(
            f"redis appendfsync {appendfsync}: ping {costs['ping']['p50_us']:.0f} us, set "
            f"{costs['set_100_bytes']['p50_us']:.0f} us, commit {commits} us (p50)"
        )
    return result


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- bytes


def record_sizes() -> list[dict[str, Any]]:
    """For each bundled model: the framed snapshot of a session's state, and one step's
    logged command (a call record of one operation), as the stores write them."""
    from models import checkpoint
    from protos import journal_pb2, memserve_pb2, tensors
    from serving.durable.records import frame, operation_record
    from serving.export import export_state
    from serving.protocol import BeginRow, DecodeRow, Operation

    session_id, digest, step = secrets.token_hex(16), "0" * 64, 1024
    rng = np.random.default_rng(0)
    rows = []
    for name in ("ntm-copy", "dnc-recall", "vmed-chat"):
        model = checkpoint.load(name)
        pool = model.new_pool(1)
        model.reset(pool, range(1))
        state = pool.read(0)
        snapshot = journal_pb2.Record(
            snapshot=journal_pb2.Snapshot(
                session_id=session_id,
                step=step,
                state=export_state(state, name, digest, step),
            )
        )
        operations: dict[str, Any]
        if name == "vmed-chat":  # a Generate turn's steps: prompt tokens, a begin, decodes
            latent = int(getattr(model, "config").latent_size)  # noqa: B009 - VMED only
            noise = rng.standard_normal(latent).astype(np.float32)
            operations = {
                "encode": operation_record(Operation.ENCODE, 1234),
                "decode": operation_record(Operation.DECODE, DecodeRow(1234, 0.0, 0, 1.0, 0.0)),
                "begin": operation_record(Operation.BEGIN, BeginRow(noise, 0.5)),
            }
        else:
            row = (rng.random(model.input_size) > 0.5).astype(np.float32)
            operations = {"step": operation_record(Operation.STEP, row)}

        def call(operation: Any, steps: int, output: int = 0) -> int:
            record = journal_pb2.CallCommitted(
                session_id=session_id,
                from_step=step,
                to_step=step + steps,
                operations=[operation] * steps,
            )
            if output:  # a request id's answer: [T, output] float32 outputs
                answer = memserve_pb2.StepResponse(step=step + steps)
                tensors.encode_into(answer.outputs, np.zeros((steps, output), np.float32))
                record.response.CopyFrom(
                    journal_pb2.Response(
                        request_id=secrets.token_hex(16), request_digest=bytes(32), step=answer
                    )
                )
            return len(frame(journal_pb2.Record(call=record)))

        first = next(iter(operations.values()))
        row_record: dict[str, Any] = {
            "model": name,
            "state_bytes": int(model.state_bytes),
            "snapshot_record_bytes": len(frame(snapshot)),
            "step_record_bytes": {kind: call(op, 1) for kind, op in operations.items()},
            "bytes_per_step_in_a_call_of_20": call(first, 20) / 20,
        }
        if name != "vmed-chat":
            row_record["step_record_bytes_with_request_id"] = call(first, 1, model.output_size)
        row_record["snapshot_over_step"] = (
            row_record["snapshot_record_bytes"]
            / row_record["step_record_bytes"][next(iter(operations))]
        )
        rows.append(row_record)
    return rows


# ---------------------------------------------------------------------------- recovery


def event_time(event: dict[str, Any] | None) -> float:
    """A log line's wall-clock time (milliseconds) as a Unix time; NaN without one."""
    if event is None:
        return float("nan")
    moment = datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=timezone.utc).timestamp()


def start_timed(server: DurableServer) -> dict[str, float]:
    """Start a server and say when it got where: from the moment before its process starts
    to its model loaded, its store opened (every stored session adopted) and "serving"
    (from its log lines' times, ms), and to `start` seeing that line (polled)."""
    began = time.time()
    server.start()
    seen = time.time() - began
    return {
        "to_model_loaded_s": event_time(server.event("model_loaded")) - began,
        "to_store_opened_s": event_time(server.event("store_opened")) - began,
        "to_serving_s": event_time(server.event("serving")) - began,
        "to_serving_seen_s": seen,
    }


def recovery_inputs(input_size: int) -> Any:
    rng = np.random.default_rng(7)
    inputs = (rng.random((1, input_size)) > 0.5).astype(np.float32)
    inputs[:, -1] = 0.0
    return inputs


async def call_each(
    target: str,
    session_ids: list[str],
    concurrency: int,
    expected: int | None,
    input_size: int,
    create: bool = False,
    calls: int = 1,
) -> dict[str, Any]:
    """`calls` Step calls (T=1) on each session, `concurrency` sessions at a time (made first
    if `create`); the seconds from the first call to the last answer, per-call latency, and
    the sessions whose step count after a call was not `expected` + 1 (when given). If no
    call is answered for STALL_SECONDS the rest are given up and `stalled` says so."""
    from clients import AsyncClient, MemserveError

    inputs = recovery_inputs(input_size)
    latency = Latencies()
    errors: dict[str, int] = {}
    wrong: list[str] = []
    queue = list(range(len(session_ids)))
    queue.reverse()
    last_answer = time.perf_counter()

    async with AsyncClient(target, timeout=None) as client:

        async def worker() -> None:
            nonlocal last_answer
            while queue:
                index = queue.pop()
                try:
                    if create:
                        info = await client.create_session(MODEL, ttl_seconds=SESSION_TTL)
                        session_ids[index] = info.session_id
                    for number in range(calls):
                        started = time.perf_counter()
                        stepped = await client.step(session_ids[index], inputs)
                        last_answer = time.perf_counter()
                        latency.record(last_answer - started)
                        if expected is not None and stepped.step != expected + number + 1:
                            wrong.append(session_ids[index])
                except MemserveError as error:
                    errors[error.code.name] = errors.get(error.code.name, 0) + 1

        began = time.perf_counter()
        workers = asyncio.gather(*(worker() for _ in range(concurrency)))
        stalled = False
        while not workers.done():
            await asyncio.wait([workers], timeout=1.0)
            if not workers.done() and time.perf_counter() - last_answer > STALL_SECONDS:
                stalled = True
                workers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await workers
        seconds = (last_answer if stalled else time.perf_counter()) - began
    summary = latency.microseconds() if latency.count else {}
    return {
        "sessions": len(session_ids),
        "calls": latency.count,
        "seconds": seconds,
        "calls_per_s": latency.count / seconds if seconds else 0.0,
        "latency_us": summary,
        "errors": errors,
        "wrong_step": len(wrong),
        "stalled": stalled,
    }


def store_size(kind: str, directory: Path, redis_server: RedisServer | None) -> int:
    """Bytes of the store on disk: the dir: segments, or Redis's append-only files."""
    where = directory if kind == "dir" else (redis_server.directory if redis_server else None)
    if where is None:
        return 0
    return sum(p.stat().st_size for p in where.rglob("*") if p.is_file() and p.suffix != ".sock")


def open_store_seconds(url: str) -> dict[str, float]:
    """The store opened and listed in this process, as a server does at start: the share
    of the restart that is the store's index (dir: reads every segment)."""
    from serving.durable import open_store

    began, cpu = time.perf_counter(), time.process_time()
    store = open_store(url)
    opened, opened_cpu = time.perf_counter(), time.process_time()
    found = store.sessions()
    listed, listed_cpu = time.perf_counter(), time.process_time()
    store.close()
    return {
        "open_s": opened - began,
        "list_s": listed - opened,
        "sessions": len(found),
        "open_cpu_s": opened_cpu - cpu,
        "list_cpu_s": listed_cpu - opened_cpu,
    }


def measure_recovery(kind: str, settings: Settings, work: Path, input_size: int) -> dict[str, Any]:
    """N sessions of K calls on a `kind` store; kill -9; the same store again."""
    config = StoreConfig(f"recovery-{kind}", kind, "launch")
    directory = Path(tempfile.mkdtemp(prefix=f"bench-durability-{kind}-", dir=settings.store_dir))
    result: dict[str, Any] = {
        "slots": settings.recovery_slots,
        "store": kind,
        "durability": "launch",
        "sessions": settings.sessions,
        "calls_per_session": settings.calls_per_session,
        "concurrency": settings.recovery_concurrency,
    }
    with contextlib.ExitStack() as stack:
        stack.callback(remove_tree, directory)
        redis_server = None
        if kind == "redis":
            redis_server = stack.enter_context(RedisServer(work / "redis-recovery"))
        url = store_url(kind, directory / "store", redis_server)

        def server() -> DurableServer:
            slots = ("--slots", str(settings.recovery_slots))
            return DurableServer(config, work, url, redis_server, settings.server_env, slots)

        first = server()
        result["start_empty"] = start_timed(first)
        ids = [""] * settings.sessions
        try:
            fill = asyncio.run(
                call_each(
                    first.target,
                    ids,
                    settings.recovery_concurrency,
                    0,
                    input_size,
                    create=True,
                    calls=settings.calls_per_session,
                )
            )
            result["fill"] = fill
            print(
                f"recovery {kind}: {settings.sessions} sessions x {settings.calls_per_session} "
                f"calls in {fill['seconds']:.1f} s, errors {fill['errors']}"
            )
            result["model_process_exited"] = kill_server(first)
        finally:
            kill_server(first)
        result["store_bytes"] = store_size(kind, directory / "store", redis_server)
        result["open_in_process"] = open_store_seconds(url)

        second = server()
        try:
            result["restart"] = start_timed(second)
            adopted = second.event("store_opened") or {}
            result["adopted"] = adopted.get("sessions", 0)
            first_calls = asyncio.run(
                call_each(
                    second.target,
                    ids,
                    settings.recovery_concurrency,
                    settings.calls_per_session,
                    input_size,
                )
            )
            result["first_calls"] = first_calls
            if not first_calls["stalled"]:
                result["second_calls"] = asyncio.run(
                    call_each(
                        second.target,
                        ids,
                        settings.recovery_concurrency,
                        settings.calls_per_session + 1,
                        input_size,
                    )
                )
        finally:
            if result.get("second_calls") is not None:
                second.stop()
            kill_server(second)  # a hung one does not stop
    restart, first_calls = result["restart"], result["first_calls"]
    again = result.get("second_calls")
    print(
        f"recovery {kind}: serving {restart['to_serving_s']:.2f} s after start "
        f"({result['start_empty']['to_serving_s']:.2f} s on an empty store), "
        f"{result['adopted']} sessions known; first call on each: "
        f"{first_calls['seconds']:.2f} s, errors {first_calls['errors']}, wrong step "
        f"{first_calls['wrong_step']}"
        + (f"; STALLED after {first_calls['calls']} calls" if first_calls["stalled"] else "")
        + (f"; a second call on each: {again['seconds']:.2f} s" if again else "")
    )
    return result


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a server's model process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def kill_server(server: ChildServer, wait: float = 10.0) -> bool:
    """kill -9 of the server; True if its other processes then exited by themselves within
    `wait` seconds (the model process sees its pipe close), else they are killed too."""
    if server.process is None or server.process.poll() is not None:
        return True
    left = children(server.pid)
    server.signal(signal.SIGKILL)
    server.wait()
    deadline = time.monotonic() + wait
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if Path(f"/proc/{pid}").exists()]
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return not left


def recovery_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The target is judged on (a), start to "serving" with every session known: from then
    on every session answers, its state brought back on its first call (docs/serving.md).
    (b), the first call on each, is recorded beside it against the same line: it is the
    time to serve N calls that each replay a session, bounded by the server's throughput."""
    stores = {}
    for result in results:
        ready = result["restart"]["to_serving_s"]
        complete = result["adopted"] == result["sessions"]
        first = result["first_calls"]
        correct = not (first["errors"] or first["wrong_step"] or first["stalled"])
        correct = correct and first["calls"] == result["sessions"]
        stores[result["store"]] = {
            "to_serving_s": ready,
            "all_sessions_known": complete,
            "pass": ready < RECOVERY_SECONDS and complete,
            "first_calls_s": first["seconds"],
            "first_calls_correct": correct,
            "first_calls_under_threshold": first["seconds"] < RECOVERY_SECONDS and correct,
        }
    return {
        "threshold_s": RECOVERY_SECONDS,
        "judged_on": "to_serving_s",
        "stores": stores,
        "pass": bool(stores) and all(s["pass"] for s in stores.values()),
    }


# ---------------------------------------------------------------------------- output


def print_table(record: dict[str, Any]) -> None:
    """Medians over the rounds, the commit costs, the bytes, recovery, the verdicts."""
    levels = record.get("levels", [])
    if levels:
        print(
            "\nthroughput, median over rounds (session-steps/s; latency per call in ms; "
            "ratio: median of the rounds' store / memory)"
        )
        print(
            f"{'shape':>9} {'C':>4} {'store':>14} | {'steps/s':>9} {'p50':>8} {'p99':>8} | "
            f"{'ratio':>5} {'rounds':<24} {'batch':>5} {'store cpu':>9}"
        )
        for shape, concurrency in zip(SHAPES, record["settings"]["concurrency"], strict=True):
            for config in CONFIGS:
                rows = [r for r in levels if (r["config"], r["shape"]) == (config.name, shape.name)]
                ratios = [by_config[config.name][shape.name] for by_config in record["ratios"]]
                rate = median_of([r["session_steps_per_s"] for r in rows])
                p50 = median_of([r["latency_us"]["p50"] for r in rows]) / 1e3
                p99 = median_of([r["latency_us"]["p99"] for r in rows]) / 1e3
                batch = median_of(
                    [(r["batching"] or {}).get("mean_batch_size", float("nan")) for r in rows]
                )
                store_cpu = median_of([r["store_cpu_seconds"] / r["seconds"] for r in rows])
                flag = "" if all(r["ok"] for r in rows) else "  ERRORS"
                print(
                    f"{shape.name:>9} {concurrency:>4} {config.name:>14} | {rate:>9.1f} "
                    f"{p50:>8.2f} {p99:>8.2f} | {median_of(ratios):>5.3f} "
                    f"{' '.join(f'{x:.2f}' for x in ratios):<24} {batch:>5.1f} "
                    f"{store_cpu:>9.2f}{flag}"
                )
    costs = record.get("commit_costs")
    if costs:
        print("\ncommit costs (microseconds, p50 / p99)")
        for row in costs["appends"]:
            print(
                f"  write + fdatasync {row['bytes']:>7} B: {row['p50_us']:>9.0f} "
                f"{row['p99_us']:>9.0f}"
            )
        for row in costs["dir_commit"]:
            print(
                f"  dir: commit {row['launch']:>11} ({row['bytes']:>7} B): "
                f"{row['p50_us']:>9.0f} {row['p99_us']:>9.0f}"
            )
        for appendfsync, redis_costs in costs["redis"].items():
            print(
                f"  redis appendfsync {appendfsync}: ping {redis_costs['ping']['p50_us']:.0f} / "
                f"{redis_costs['ping']['p99_us']:.0f}, set 100 B "
                f"{redis_costs['set_100_bytes']['p50_us']:.0f} / "
                f"{redis_costs['set_100_bytes']['p99_us']:.0f}"
            )
            for row in redis_costs["commit"]:
                print(
                    f"    commit {row['launch']:>11} ({row['bytes']:>7} B): "
                    f"{row['p50_us']:>9.0f} {row['p99_us']:>9.0f}"
                )
    sizes = record.get("record_bytes")
    if sizes:
        print("\nbytes: a snapshot against one step's logged command (framed records)")
        for row in sizes:
            steps = ", ".join(f"{kind} {size}" for kind, size in row["step_record_bytes"].items())
            print(
                f"  {row['model']:>10}: state {row['state_bytes']}, snapshot "
                f"{row['snapshot_record_bytes']}, one step ({steps}), per step in a call "
                f"of 20 {row['bytes_per_step_in_a_call_of_20']:.1f}; snapshot / step "
                f"{row['snapshot_over_step']:.0f}x"
            )
    for result in record.get("recovery", []):
        restart, opened = result["restart"], result["open_in_process"]
        print(
            f"\nrecovery {result['store']}: {result['sessions']} sessions x "
            f"{result['calls_per_session']} calls, store {result['store_bytes'] / 1e6:.1f} MB; "
            f"new process to serving {restart['to_serving_s']:.2f} s (model loaded "
            f"{restart['to_model_loaded_s']:.2f}, store opened {restart['to_store_opened_s']:.2f};"
            f" empty store: {result['start_empty']['to_serving_s']:.2f}); store opened and "
            f"listed in-process {opened['open_s'] + opened['list_s']:.2f} s; first call on "
            f"each at C={result['concurrency']}: {result['first_calls']['seconds']:.2f} s"
            + (" (STALLED)" if result["first_calls"]["stalled"] else "")
            + (
                f", then a second: {result['second_calls']['seconds']:.2f} s"
                if result.get("second_calls")
                else ""
            )
        )
    targets = record.get("targets", {})
    if targets:
        print("\ntargets (throughput: each ratio per round, decided on the median)")
    for config, result in targets.get("throughput", {}).items():
        for shape, decided in result["shapes"].items():
            rounds = " ".join(f"{ratio:.3f}" for ratio in decided["rounds"])
            print(
                f"  {config} / memory, {shape}: median {decided['median']:.3f} "
                f"(>= {decided['threshold']}: {verdict(decided['pass'])}); rounds {rounds}"
            )
        print(f"  {config}: {verdict(result['pass'])}")
    recovery = targets.get("recovery")
    if recovery:
        for kind, decided in recovery["stores"].items():
            print(
                f"  recovery {kind}: start to serving {decided['to_serving_s']:.2f} s "
                f"(< {recovery['threshold_s']:g} s: {verdict(decided['pass'])}); first call on "
                f"every session {decided['first_calls_s']:.2f} s"
            )


# ---------------------------------------------------------------------------- main


def filesystem_of(path: Path) -> dict[str, Any]:
    """The mount a path is on, and whether the repository is on the same device."""
    best = ("", "", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            resolved = str(path.resolve())
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) >= len(best[1]):
                best = (device, mount, kind)
    return {
        "path": str(path),
        "device": best[0],
        "mount": best[1],
        "type": best[2],
        "same_device_as_repository": os.stat(path).st_dev == os.stat(ROOT).st_dev,
    }


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: the load average and the busiest processes (ps's
    %CPU: their average over their lifetime)."""
    done = subprocess.run(
        ["ps", "-eo", "pid,pcpu,etime,comm,args", "--sort=-pcpu"], capture_output=True, text=True
    )
    busiest = [line[:200] for line in done.stdout.splitlines()[1:6]]
    return {"loadavg_1_5_15": list(os.getloadavg()), "busiest": busiest}


@contextlib.contextmanager
def servers_running(settings: Settings, work: Path) -> Iterator[list[DurableServer]]:
    """The five throughput servers, each on its own store, for the whole benchmark."""
    with contextlib.ExitStack() as stack:
        servers: list[DurableServer] = []
        for config in CONFIGS:
            redis_server = None
            if config.store == "redis":
                redis_server = stack.enter_context(RedisServer(work / f"redis-{config.name}"))
            directory = Path(
                tempfile.mkdtemp(prefix=f"bench-durability-{config.name}-", dir=settings.store_dir)
            )
            stack.callback(remove_tree, directory)
            url = store_url(config.store, directory / "store", redis_server)
            servers.append(DurableServer(config, work, url, redis_server, settings.server_env))
        for server in servers:
            server.start()
            stack.callback(server.stop)  # before its store goes
        yield servers


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds (median)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring window per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per level")
    parser.add_argument("--channels", type=int, default=1, help="client channels (round robin)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs=2,
        default=list(CONCURRENCY),
        metavar=("C_T1", "C_T20"),
        help="client sessions of the T=1 and the T=20 level",
    )
    parser.add_argument(
        "--level-ttl",
        type=float,
        default=5.0,
        help="seconds a level's sessions outlive it before they expire (they are not deleted)",
    )
    parser.add_argument("--sessions", type=int, default=10_000, help="recovery: sessions")
    parser.add_argument(
        "--calls-per-session", type=int, default=3, help="recovery: Step calls (T=1) on each"
    )
    parser.add_argument(
        "--recovery-concurrency",
        type=int,
        default=8,
        help="recovery: sessions at a time (at 64 the server deadlocked: docs/performance.md)",
    )
    parser.add_argument(
        "--recovery-slots",
        type=int,
        help="recovery: the server's --slots (default: --sessions, a slot for every session; "
        "at 256 a restart deadlocked, docs/performance.md)",
    )
    parser.add_argument(
        "--commit-seconds", type=float, default=2.0, help="timing budget per commit cost"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure"
    )
    parser.add_argument(
        "--store-dir",
        default=tempfile.gettempdir(),
        help="where dir: stores and the fdatasync test go (default: the temporary directory; "
        "the record says whether it is on the repository's disk)",
    )
    parser.add_argument(
        "--server-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="extra environment for the memserve children (repeatable)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: bench/results/durability-cpu.json)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0 or args.channels < 1:
        parser.error("--rounds and --channels must be >= 1, --seconds > 0, --warmup >= 0")
    if any(c < 1 or c > 256 for c in args.concurrency) or args.level_ttl <= 0:
        parser.error("--concurrency must be in 1..256 (the servers' slots), --level-ttl > 0")
    if args.sessions < 1 or args.calls_per_session < 1 or args.recovery_concurrency < 1:
        parser.error("--sessions, --calls-per-session and --recovery-concurrency must be >= 1")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    return args


PARTS = ("throughput", "commit", "bytes", "recovery")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    settings = Settings(
        seconds=args.seconds,
        warmup=args.warmup,
        rounds=args.rounds,
        channels=args.channels,
        sessions=args.sessions,
        calls_per_session=args.calls_per_session,
        recovery_concurrency=args.recovery_concurrency,
        recovery_slots=args.recovery_slots or args.sessions,
        concurrency=args.concurrency,
        level_ttl=args.level_ttl,
        commit_seconds=args.commit_seconds,
        parts=args.parts,
        store_dir=args.store_dir,
        server_env=args.server_env,
    )
    from models import checkpoint

    model = checkpoint.load(MODEL)
    input_size, output_size = model.input_size, model.output_size
    record: dict[str, Any] = {
        **provenance("durability", "bench/durability.py", argv),
        "settings": {
            **asdict(settings),
            "kernel_backend": "torch",
            "shapes": [
                {"shape": s.name, "steps_per_call": s.steps, "concurrency": c}
                for s, c in zip(SHAPES, settings.concurrency, strict=True)
            ],
            "configs": [asdict(c) for c in CONFIGS],
            "server_command": server_command(True)[1:],
        },
        "store_filesystem": filesystem_of(Path(settings.store_dir)),
        "load_before": machine_load(),
    }
    targets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-durability-") as scratch:
        work = Path(scratch)
        if "throughput" in settings.parts:
            with servers_running(settings, work) as servers:
                levels = asyncio.run(measure_throughput(settings, servers, input_size, output_size))
            ratios = round_ratios(levels, settings.rounds)
            record["levels"] = [level.record() for level in levels]
            record["ratios"] = ratios
            targets["throughput"] = throughput_targets(levels, ratios)
        if "commit" in settings.parts:
            record["commit_costs"] = measure_commit_costs(settings, work, input_size)
        if "bytes" in settings.parts:
            record["record_bytes"] = record_sizes()
        if "recovery" in settings.parts:
            record["recovery"] = [
                measure_recovery(kind, settings, work, input_size) for kind in ("dir", "redis")
            ]
            targets["recovery"] = recovery_verdict(record["recovery"])
    record["targets"] = targets
    record["load_after"] = machine_load()
    print_table(record)
    write_record(record, args.out or ROOT / "bench" / "results" / "durability-cpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of `memserve cluster`: what the edge (Envoy) and the shared store (Redis) cost
per step, and how long a replica's sessions wait when it is killed.

With the bundled model `ntm-copy` and unary Step calls of `--rows` rows, one session per
client task (`--concurrency` of them, closed loop), the load client being this process
(grpc.aio) on the same cores as the servers:

1. throughput and latency, in one run: a lone server with the memory store (`lone`); one
   replica of the cluster spoken to directly (`direct`: its store is the cluster's Redis);
   and through Envoy with 1 replica (`envoy-1`), in `--rounds` interleaved rounds (the
   order rotating; medians decide, as the machine's other work changes from minute to
   minute); then through Envoy with 2 and 3 replicas (the cluster scaled), once each.
   Each is measured for `--seconds` after `--warmup`: steps/s, p50 and p99, and the
   ratios: direct / lone (the shared store's cost), envoy-1 / direct (the edge's), and
   envoy-N / envoy-1. On a machine with few cores more replicas cannot add throughput: they
   share the same cores (the record says how many).
2. failover: with 3 replicas under the same load, `kill -9` a replica (chosen at random
   from a seeded RNG among those holding sessions) `--kills` times, waiting between kills
   until it is back; for every session it held, the pause from the kill to that session's
   first answer to a call sent after the kill (a retry of a call the kill cut off, or the
   call after an answer that was on its way). p50 and p99 over all of them.

Every number goes to the JSON (default bench/results/cluster-cpu.json).

    python bench/cluster.py                      # the full run (about 3 minutes here)
    python bench/cluster.py --rounds 1 --seconds 1 --warmup 0.3 --kills 1 --replicas 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose serving.py shadows nothing here

from bench.child_cluster import Cluster  # noqa: E402
from bench.child_server import ServerProcess  # noqa: E402
from bench.serving import provenance, write_record  # noqa: E402
from clients.channel import SESSION_HEADER  # noqa: E402
from protos import memserve_pb2, memserve_pb2_grpc, tensors  # noqa: E402

MODEL = "ntm-copy"
INPUT_SIZE = 9
SNAPSHOT_EVERY = 64  # the replicas write a session in whole this often (docs/cluster.md)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Window:
    """One closed-loop measuring window."""

    seconds: float = 0.0
    steps: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, per answered call

    def summary(self) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        return {
            "calls": len(self.latencies),
            "steps_per_s": round(self.steps / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
        }


class Sessions:
    """`concurrency` sessions made through `target`, stepped by closed-loop tasks; every
        call names its session in the routing header and is sent again (same request id) after
        UNAVAILABLE, as memserve's clients do. `answered[i]` lists (sent, answered) of session i's
    calls: when the try that was answered was sent, and when it was answered."""

    def __init__(self, target: str, concurrency: int, rows: int) -> None:
        self.target, self.concurrency, self.rows = target, concurrency, rows
        self.ids: list[str] = []
        self.answered: list[list[tuple[float, float]]] = []
        self.window: Window | None = None
        self.stopping = False

    async def run(self, ready: asyncio.Event, done: asyncio.Event) -> None:
        options = [("grpc.enable_http_proxy", 0)]
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            stub = memserve_pb2_grpc.MemServeStub(channel)  # type: ignore[no-untyped-call]
            create = memserve_pb2.CreateSessionRequest(model=MODEL)
            for _ in range(self.concurrency):
                made = await stub.CreateSession(create, timeout=60)
                self.ids.append(made.session_id)
                self.answered.append([])
            ready.set()
            await asyncio.gather(*(self._loop(stub, i) for i in range(self.concurrency)))
        done.set()

    async def _loop(self, stub: memserve_pb2_grpc.MemServeStub, index: int) -> None:
        session = self.ids[index]
        metadata = ((SESSION_HEADER, session),)
        rng = np.random.default_rng(index)
        while not self.stopping:
            inputs = tensors.encode(rng.random((self.rows, INPUT_SIZE), dtype=np.float32))
            request = memserve_pb2.StepRequest(
                session_id=session, inputs=inputs, request_id=uuid.uuid4().hex
            )
            started = time.perf_counter()
            while True:
                sent = time.monotonic()
                try:
                    await stub.Step(request, timeout=60, metadata=metadata)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRIED or self.stopping:
                        raise
                    await asyncio.sleep(0.01)
            now = time.perf_counter()
            self.answered[index].append((sent, time.monotonic()))
            if self.window is not None:
                self.window.steps += self.rows
                self.window.latencies.append(now - started)


class Driver:
    """Sessions driven from an event loop in a thread of this process, so that the main
    thread can scale and kill while they run."""

    def __init__(self, target: str, concurrency: int, rows: int) -> None:
        self.sessions = Sessions(target, concurrency, rows)
        self.loop = asyncio.new_event_loop()
        self.ready, self.done = asyncio.Event(), asyncio.Event()
        self.future: Any = None

    def __enter__(self) -> Driver:
        import threading

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.future = asyncio.run_coroutine_threadsafe(
            self.sessions.run(self.ready, self.done), self.loop
        )
        deadline = time.monotonic() + 120
        while not self.ready.is_set():
            if self.future.done():
                self.future.result()  # raises what failed
            assert time.monotonic() < deadline, "the sessions were not made in 120 s"
            time.sleep(0.05)
        return self

    def measure(self, warmup: float, seconds: float) -> dict[str, Any]:
        time.sleep(warmup)
        window = Window()
        self.sessions.window = window
        started = time.perf_counter()
        time.sleep(seconds)
        self.sessions.window = None
        window.seconds = time.perf_counter() - started
        self.check()
        return window.summary()

    def check(self) -> None:
        if self.future.done():
            self.future.result()

    def __exit__(self, *details: object) -> None:
        self.sessions.stopping = True
        with contextlib.suppress(Exception):
            self.future.result(timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)


def failover(cluster: Cluster, args: argparse.Namespace, chooser: random.Random) -> dict[str, Any]:
    """Kill -9 a replica holding sessions, `args.kills` times; the pause of each of its
    sessions from the kill to its first answer after it."""
    pauses: list[float] = []
    with Driver(cluster_target(cluster), args.concurrency, args.rows) as driver:
        sessions = driver.sessions
        for _ in range(args.kills):
            cluster.healthy(3)
            settled_from = time.monotonic()
            while not all(sum(1 for s, _ in a if s > settled_from) >= 2 for a in sessions.answered):
                driver.check()
                time.sleep(0.05)
            time.sleep(chooser.uniform(0.0, 1.0))
            table = cluster.table()
            owners = sorted({table.replica_of(s) for s in sessions.ids})
            victim = chooser.choice(owners)
            held = [i for i, s in enumerate(sessions.ids) if table.replica_of(s) == victim]
            killed_at = time.monotonic()
            pid = cluster.signal(victim, signal.SIGKILL)
            for index in held:  # the first answer to a call sent after the kill
                deadline = time.monotonic() + 120
                while not any(s > killed_at for s, _ in sessions.answered[index]):
                    driver.check()
                    assert time.monotonic() < deadline, "a session was not answered in 120 s"
                    time.sleep(0.005)
                first = next(t for s, t in sessions.answered[index] if s > killed_at)
                pauses.append(first - killed_at)
            cluster.wait_for(partial(restarted, name=victim, old_pid=pid), 300, "a restart")
    ms = np.array(pauses) * 1000
    return {
        "kills": args.kills,
        "sessions_paused": len(pauses),
        "pauses_ms": [round(float(p), 1) for p in sorted(ms)],
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def restarted(state: dict[str, Any], name: str, old_pid: int) -> bool:
    """Whether replica `name` runs again (another PID) and serves."""
    return any(p["name"] == name and p["pid"] != old_pid and p["health"] == "serving"
               for p in state["processes"])  # fmt: skip


def cluster_target(cluster: Cluster, replica: str | None = None) -> str:
    if replica is None:
        return f"127.0.0.1:{cluster.state()['port']}"
    return f"127.0.0.1:{cluster.process_of(replica)['port']}"


def measure(target: str, args: argparse.Namespace) -> dict[str, Any]:
    with Driver(target, args.concurrency, args.rows) as driver:
        return driver.measure(args.warmup, args.seconds)


def scale(cluster: Cluster, count: int) -> None:
    if len(cluster.replica_names(cluster.state())) != count:
        done = cluster.command_line("scale", str(count))
        assert done.returncode == 0, done.stdout + done.stderr
    cluster.healthy(count)


def median_of(rounds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The round's summary of `name` whose steps/s is the median (the lower of two)."""
    ordered = sorted((r[name] for r in rounds), key=lambda m: m["steps_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2])


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """The lone server, the replica directly and Envoy with the fewest replicas in
    `args.rounds` rounds (their order rotating), then Envoy with each larger count once,
    then the failover. Ratios are medians of each round's own."""
    chooser = random.Random(args.seed)
    counts = sorted(args.replicas)
    first = f"envoy-{counts[0]}"
    rounds: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    lone = ServerProcess(directory, "--models", MODEL, "--store", "memory")
    cluster = Cluster(
        directory / "cluster", counts[0], "--models", MODEL,
        "--snapshot-every", str(SNAPSHOT_EVERY),
    )  # fmt: skip
    with lone:
        cluster.start()
        try:
            cluster.healthy(counts[0])
            targets = {"lone": lone.target, "direct": cluster_target(cluster, "r1"),
                       first: cluster_target(cluster)}  # fmt: skip
            names = list(targets)
            for number in range(args.rounds):
                order = names[number % len(names) :] + names[: number % len(names)]
                rounds.append({name: measure(targets[name], args) for name in order})
                print(f"round {number + 1}: {rounds[-1]}", flush=True)
            for name in names:
                results[name] = median_of(rounds, name)
            for count in counts[1:]:
                scale(cluster, count)
                results[f"envoy-{count}"] = measure(cluster_target(cluster), args)
                print(f"envoy-{count}: {results[f'envoy-{count}']}", flush=True)
            if args.kills:
                scale(cluster, 3)
                results["failover"] = failover(cluster, args, chooser)
                print(f"failover: {results['failover']}", flush=True)
        finally:
            cluster.stop()

    def ratio(a: str, b: str) -> float:
        values = [r[a]["steps_per_s"] / r[b]["steps_per_s"] for r in rounds]
        return round(float(statistics.median(values)), 3)

    ratios: dict[str, float | None] = {
        "direct_vs_lone": ratio("direct", "lone"),
        "envoy_1_vs_direct": ratio(first, "direct") if counts[0] == 1 else None,
    }
    for count in counts[1:]:
        ratios[f"envoy_{count}_vs_envoy_{counts[0]}"] = round(
            results[f"envoy-{count}"]["steps_per_s"] / results[first]["steps_per_s"], 3
        )
    return {"results": results, "ratios": ratios, "rounds": rounds}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window [5]")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds [2]")
    parser.add_argument(
        "--concurrency", type=int, default=12, help="sessions, one closed-loop task each [12]"
    )
    parser.add_argument("--rows", type=int, default=1, help="rows (steps) per Step call [1]")
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 3],
        help="replica counts measured through Envoy, in this order [1 2 3]",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="rounds of lone, direct and Envoy with the fewest replicas, interleaved [3]",
    )  # fmt: skip
    parser.add_argument("--kills", type=int, default=5, help="kill -9 for the failover [5]")
    parser.add_argument("--seed", type=int, default=None, help="the kills' RNG seed [random]")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "cluster-cpu.json",
        help="where the JSON record goes [bench/results/cluster-cpu.json]",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    print(f"seed {args.seed}", flush=True)
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="memserve-bench-cluster-") as tmp:
        measured = run(args, Path(tmp))
    record = {
        **provenance("cluster", "bench/cluster.py", argv),
        "settings": {
            "model": MODEL, "concurrency": args.concurrency, "rows": args.rows,
            "seconds": args.seconds, "warmup": args.warmup, "replicas": args.replicas,
            "rounds": args.rounds, "kills": args.kills, "seed": args.seed,
            "snapshot_every": SNAPSHOT_EVERY,
        },
        **measured,
        "wall_seconds": round(time.monotonic() - started, 1),
        # the machine's 1-minute load average before and after: other work shares the cores
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of durable sessions: what committing every call costs a server, what one commit
costs, how many bytes a step logs, and how fast a killed server comes back on its store.

1. Throughput (bench/durability_throughput.py). `memserve serve --models ntm-copy` (PyTorch
   reference kernels, default settings, as bench/serving.py) on five stores, all running
   for the whole benchmark: `memory` (the reference), `dir:` (a temporary directory under
   `--store-dir`; the record says whether that is the repository's disk) and `redis://` (a
   real redis-server on a Unix socket, `appendonly yes`, `appendfsync always`:
   bench/redis_server.py), each of the last two with `--durability launch` and `interval`.
   Two call shapes: unary Step with T=1 at C=64 and with T=20 at C=256, each level measured
   by bench/serving.py's `measure_level` (the load generator's closed loop, recorder and
   scraper), on sessions left to expire `--level-ttl` seconds after their level rather than
   deleted (`ExpiringCalls` says why). Every level begins once no server holds a session,
   so that no server's expiry work (snapshots, deletions committed) falls in another's
   window; a level's record says how many sessions the other servers held as it ended (0).
   Each of `--rounds` rounds measures every (shape, store) back to back, the stores in one
   order in odd rounds and in the reverse order in even ones (an even number of rounds, the
   default, gives both orders the same weight); a store's session-steps/s is divided by
   `memory`'s of the same round and shape, and the targets are decided on the median of
   those per-round ratios.
2. Commit cost (bench/durability_commits.py). write + fdatasync of appends of a launch's
   size on the store's disk; a redis round trip (PING, and a SET, which `appendfsync
   always` syncs); each store's own `commit` of one launch's call records (Redis also with
   `appendfsync no`, which tells its fsync apart).
3. Bytes (bench/durability_bytes.py). A state snapshot against one step's logged command
   (its framed record), for each bundled model: the numbers behind command logging with
   periodic snapshots.
4. Recovery (bench/durability_recovery.py). `--sessions` sessions with
   `--calls-per-session` Step calls (T=1) each, on `dir:` and on `redis://` (`--durability
   launch`); kill -9 of the server; a new server on the same store: (a) its process's start
   to its "serving" log line (every session known: the store's index read), (b) the first
   call on every session, `--recovery-concurrency` at a time (each brings its session's
   state back: the calls replayed in the model process). The target is judged on (a), and
   passes only if the server came back whole: every session known and its first call
   answered at the right step (`recovery_verdict`).
5. Flush (bench/durability_flush.py). `memory`'s server at T=1 while another process appends
   and fdatasyncs on the store's disk 100 and 400 times a second, against none: what the
   flushes alone cost the rest of the machine.

The servers and what the parts share are in bench/durability_servers.py. It prints what each
level measured as it goes, a table last (bench/durability_report.py), and writes every
round's numbers as JSON (default bench/results/durability-cpu.json).

    python bench/durability.py                 # the full run (how long: docs/performance.md)
    python bench/durability.py --rounds 2 --seconds 2 --sessions 500
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose serving.py is not serving/

from bench.child_server import KERNEL_BACKEND  # noqa: E402
from bench.durability_bytes import record_sizes  # noqa: E402
from bench.durability_commits import measure_commit_costs  # noqa: E402
from bench.durability_flush import run as measure_flush_cost  # noqa: E402
from bench.durability_recovery import measure_recovery, recovery_verdict  # noqa: E402
from bench.durability_report import print_table  # noqa: E402
from bench.durability_servers import (  # noqa: E402
    CONCURRENCY,
    CONFIGS,
    Settings,
    filesystem_of,
    machine_load,
    servers_running,
)
from bench.durability_throughput import (  # noqa: E402
    SHAPES,
    measure_throughput,
    round_ratios,
    throughput_targets,
)
from bench.serving import MODEL, provenance, server_command, server_env, write_record  # noqa: E402

PARTS = ("throughput", "commit", "bytes", "recovery", "flush")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="throughput rounds, in alternating order (even: both orders alike); the median",
    )
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
    args.server_env = server_env(parser, args.server_env)
    return args


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
            "kernel_backend_setting": KERNEL_BACKEND,  # MEMSERVE_KERNEL_BACKEND; rows: what served
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
        if "flush" in settings.parts:
            record["flush"] = measure_flush_cost(settings, work, input_size, output_size)
    record["targets"] = targets
    record["load_after"] = machine_load()
    print_table(record)
    write_record(record, args.out or ROOT / "bench" / "results" / "durability-cpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

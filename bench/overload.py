"""Benchmark of admission control and of what TLS and API keys cost.

With the bundled model `ntm-copy` and unary Step calls of T=1, one session per client task,
over `--rounds` rounds (the order of the servers alternates from round to round):

1. overload: a server with `--max-queued-calls BOUND` (and slots for every session, so that
   nothing parks) driven at the bound (C = BOUND closed-loop tasks: every call is admitted)
   and at `--factor` times it (C = factor x BOUND): past the bound a call is refused with
   RESOURCE_EXHAUSTED and its task waits the `grpc-retry-pushback-ms` the server sent, as a
   well-behaved client (and gRPC's retry policies) do. Measured: the latency of a refusal
   (p50, p99) and the goodput, admitted steps/s at factor x the bound over steps/s at the
   bound. Targets: refusal p99 under 10 ms, goodput at least 0.9.
2. security: four servers, plaintext and open, TLS (a self-signed certificate made by
   `openssl` here), API keys (`--auth-keys`, one tenant, no quotas), TLS and keys, each at
   C = `--concurrency`: steps/s of each as a ratio to plaintext and open, same round.

The load client is this process (grpc.aio, `--channels` channels per server, round robin)
sharing the machine's cores with the servers, as in bench/serving.py. Medians over rounds
decide; every round's numbers go to the JSON (default bench/results/overload-cpu.json).

    python bench/overload.py                     # the full run (how long: docs/performance.md)
    python bench/overload.py --rounds 1 --seconds 2 --bound 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose serving.py shadows nothing here

from bench.child_server import ServerProcess  # noqa: E402
from bench.serving import provenance, write_record  # noqa: E402
from protos import memserve_pb2, memserve_pb2_grpc, tensors  # noqa: E402
from serving.tenants import hash_key, new_key  # noqa: E402

MODEL = "ntm-copy"
INPUT_SIZE = 9
REFUSAL_P99_MS = 10.0  # target: a refusal's p99 latency under this
GOODPUT = 0.9  # target: admitted steps/s at factor x the bound over steps/s at the bound
SECURITY = ("plaintext", "tls", "keys", "tls+keys")


@dataclass
class Tally:
    """One closed-loop window: calls by status code, admitted steps, latencies (µs)."""

    seconds: float
    codes: Counter[str] = field(default_factory=Counter)
    ok_latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    refused_latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))

    def summary(self) -> dict[str, Any]:
        def ms(histogram: HdrHistogram, percentile: float) -> float | None:
            if not histogram.get_total_count():
                return None
            return round(float(histogram.get_value_at_percentile(percentile)) / 1000, 3)

        return {
            "codes": dict(self.codes),
            "steps_per_s": round(self.codes["OK"] / self.seconds, 1),
            "ok_p50_ms": ms(self.ok_latency, 50),
            "ok_p99_ms": ms(self.ok_latency, 99),
            "refused_p50_ms": ms(self.refused_latency, 50),
            "refused_p99_ms": ms(self.refused_latency, 99),
        }


@dataclass(frozen=True)
class Target:
    """A server under load: where it is, how to connect, what to send with every call."""

    server: ServerProcess
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()


def pushback_seconds(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            return int(value) / 1000
    return 0.0


async def closed_loop(
    target: Target, tasks: int, channels: int, warmup: float, seconds: float
) -> Tally:
    """`tasks` sessions, each stepped one call after the other for warmup + seconds; what
    lands inside the window counts. A refused call waits its pushback, then goes again."""
    options = [("grpc.enable_http_proxy", 0)]
    opened = [
        grpc.aio.secure_channel(target.server.target, target.credentials, options)
        if target.credentials is not None
        else grpc.aio.insecure_channel(target.server.target, options)
        for _ in range(channels)
    ]
    stubs = [memserve_pb2_grpc.MemServeStub(channel) for channel in opened]  # type: ignore[no-untyped-call]
    metadata = target.metadata
    tally = Tally(seconds)
    inputs = tensors.encode(np.ones((1, INPUT_SIZE), np.float32))
    try:
        sessions = await asyncio.gather(*(
            stubs[i % channels].CreateSession(
                memserve_pb2.CreateSessionRequest(model=MODEL), metadata=metadata, timeout=60
            )
            for i in range(tasks)
        ))  # fmt: skip
        start = time.perf_counter() + warmup
        end = start + seconds

        async def run(index: int) -> None:
            stub = stubs[index % channels]
            request = memserve_pb2.StepRequest(session_id=sessions[index].session_id, inputs=inputs)
            while (began := time.perf_counter()) < end:
                wait = 0.0
                try:
                    await stub.Step(request, metadata=metadata, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                    wait = pushback_seconds(error)
                landed = time.perf_counter()
                if start <= began and landed <= end:
                    tally.codes[code] += 1
                    micros = max(1, round((landed - began) * 1e6))
                    if code == "OK":
                        tally.ok_latency.record_value(micros)
                    elif code == "RESOURCE_EXHAUSTED":
                        tally.refused_latency.record_value(micros)
                if wait:
                    await asyncio.sleep(wait)

        await asyncio.gather(*(run(i) for i in range(tasks)))
        await asyncio.gather(*(
            stubs[i % channels].DeleteSession(
                memserve_pb2.DeleteSessionRequest(session_id=session.session_id),
                metadata=metadata, timeout=60,
            )
            for i, session in enumerate(sessions)
        ))  # fmt: skip
    finally:
        for channel in opened:
            await channel.close()
    return tally


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made by openssl, valid for a day."""
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj",
         "/CN=memserve-bench", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def servers(directory: Path, bound: int, factor: int) -> Iterator[dict[str, Target]]:
    """The overload server and the four security servers, all started, stopped at the end."""
    cert, key = self_signed(directory)
    api_key = new_key()
    keys = directory / "keys.toml"
    keys.write_text(f'[tenants.bench]\nkeys = ["{hash_key(api_key)}"]\n')
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    auth = ("--auth-keys", str(keys))
    common = ("--models", MODEL, "--metrics-port", "-1")
    slots = str(bound * factor)
    arguments = {
        "overload": (*common, "--slots", slots, "--max-queued-calls", str(bound)),
        "plaintext": common,
        "tls": (*common, *tls),
        "keys": (*common, *auth),
        "tls+keys": (*common, *tls, *auth),
    }
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    bearer = (("authorization", f"Bearer {api_key}"),)
    with contextlib.ExitStack() as stack:
        processes = {name: ServerProcess(directory, *args) for name, args in arguments.items()}
        for process in processes.values():
            stack.callback(process.stop)
        with ThreadPoolExecutor(len(processes)) as starting:  # each start waits on its log
            list(starting.map(ServerProcess.start, processes.values()))
        targets = {
            name: Target(
                process, credentials if "tls" in name else None, bearer if "keys" in name else ()
            )
            for name, process in processes.items()
        }
        yield targets


def quotient(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else 0.0


async def measure_round(
    targets: dict[str, Target], settings: argparse.Namespace, round_: int
) -> dict[str, Any]:
    """One round: the overload pair (bound, factor x bound), then the four security servers,
    the order reversed in even rounds."""
    window = (settings.warmup, settings.seconds)
    result: dict[str, Any] = {"round": round_}
    levels = [("at_bound", settings.bound), ("overloaded", settings.bound * settings.factor)]
    for name, tasks in levels if round_ % 2 else levels[::-1]:
        tally = await closed_loop(targets["overload"], tasks, settings.channels, *window)
        result[name] = {"tasks": tasks, **tally.summary()}
        print(f"round {round_} {name:>10} C={tasks:<5} {result[name]}", flush=True)
    order = SECURITY if round_ % 2 else SECURITY[::-1]
    for name in order:
        tally = await closed_loop(targets[name], settings.concurrency, settings.channels, *window)
        result[name] = {"tasks": settings.concurrency, **tally.summary()}
        print(f"round {round_} {name:>10} C={settings.concurrency:<5} {result[name]}", flush=True)
    result["goodput"] = quotient(
        result["overloaded"]["steps_per_s"], result["at_bound"]["steps_per_s"]
    )
    for name in SECURITY[1:]:
        result[f"{name}_vs_plaintext"] = quotient(
            result[name]["steps_per_s"], result["plaintext"]["steps_per_s"]
        )
    return result


def decide(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets and the ratios, each the median over the rounds."""

    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return round(statistics.median(known), 3) if known else None

    refused_p99 = median([r["overloaded"]["refused_p99_ms"] for r in rounds])
    goodput = median([r["goodput"] for r in rounds])
    decided: dict[str, Any] = {
        "refusal_p50_ms": median([r["overloaded"]["refused_p50_ms"] for r in rounds]),
        "refusal_p99_ms": {
            "median": refused_p99,
            "target": f"< {REFUSAL_P99_MS}",
            "passed": refused_p99 is not None and refused_p99 < REFUSAL_P99_MS,
        },
        "goodput": {
            "median": goodput,
            "target": f">= {GOODPUT}",
            "passed": (goodput or 0) >= GOODPUT,
        },
    }
    for name in SECURITY[1:]:
        decided[f"{name}_vs_plaintext"] = median([r[f"{name}_vs_plaintext"] for r in rounds])
    return decided


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bound", type=int, default=64, help="--max-queued-calls (default 64)")
    parser.add_argument(
        "--factor", type=int, default=10, help="overload as a multiple of the bound (default 10)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="C of the security runs (default 32)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window (default 5)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds before each window (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, medians decide (default 3)")
    parser.add_argument("--channels", type=int, default=4, help="channels per server (default 4)")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/overload-cpu.json)")
    args = parser.parse_args(argv)
    for name in ("bound", "factor", "concurrency", "rounds", "channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    settings = parse_args(argv)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="memserve-overload-") as scratch,
        servers(Path(scratch), settings.bound, settings.factor) as targets,
    ):
        rounds = [
            asyncio.run(measure_round(targets, settings, round_))
            for round_ in range(1, settings.rounds + 1)
        ]
    decided = decide(rounds)
    for name, value in decided.items():
        print(f"{name}: {value}")
    record = {
        **provenance("overload", "bench/overload.py", argv),
        "settings": {**vars(settings), "out": None, "model": MODEL, "steps_per_call": 1},
        "targets": decided,
        "rounds": rounds,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    write_record(record, settings.out or ROOT / "bench" / "results" / "overload-cpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

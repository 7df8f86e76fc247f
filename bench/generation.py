"""Benchmark of Generate over loopback: C concurrent chats against a real server.

A real `memserve serve --models MODEL` runs in a child process on the PyTorch reference
kernels (MEMSERVE_KERNEL_BACKEND=torch, TRITON_INTERPRET removed), with its Prometheus
metrics on. For each level C (default 1, 8, 64) this process opens C chats, one task each
of `memserve loadgen`'s closed loop (clients/loadgen/, as in bench/serving.py): a session
(CreateSession with the chat's seed, made before the warm-up), then Generate calls back to back,
one turn after another, whose user texts are the first utterances of the Persona-Chat
exchange lines (/work/shared/data/personachat-dialogues.txt), each chat cycling through them
from its own offset. Every call asks for the same max_tokens (default 32) at temperature
1.0, top_p 0.9, with the chat's seed. After a warm-up, a fixed window is measured:

- tokens/s: the completion_tokens of the calls that completed inside the window, over it;
- calls/s, and the whole call's latency;
- TTFT: request sent -> its first text piece; inter-token latency: between successive text
  pieces of one call (HdrHistogram, microseconds, 3 digits; a value counts if it ends
  inside the window);
- errors by status code; the CPU of this client, of the server and of everything else;
- the server's own batch size (its /metrics `memserve_batch_size`) over the window.

The target: C=64 chats give at least 10x the tokens/s of one chat (the highest level over
the lowest). `--rounds` rounds (default 3) run every level, in ascending order in odd rounds
and descending in even ones; the ratio is computed per round and the target decided on its
median, since single runs on a shared machine differ too much (docs/performance.md). It
prints a table of medians and writes every round as JSON (default
bench/results/generation-cpu.json).

    python bench/generation.py        # vmed-chat, levels 1 8 64 (how long: docs/performance.md)
    python bench/generation.py --model PATH --levels 1 8 --seconds 5 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, so that `serving` is the package

from bench.child_server import KERNEL_BACKEND, ChildServer  # noqa: E402
from bench.serving import (  # noqa: E402
    BAD_RESPONSE,
    batching_over,
    cpu_name,
    median_of,
    median_verdict,
    provenance,
    quotient,
    run_level,
    server_env,
    verdict,
    write_record,
)
from clients import AsyncClient, ModelInfo  # noqa: E402
from clients.channel import Metadata  # noqa: E402
from clients.loadgen import server_metrics  # noqa: E402
from clients.loadgen.recording import Outcome  # noqa: E402
from clients.loadgen.schedule import Session  # noqa: E402
from clients.loadgen.workload import Workload, reply_outcome  # noqa: E402
from protos import memserve_pb2  # noqa: E402

MODEL = "vmed-chat"
CORPUS = ROOT.parent / "shared" / "data" / "personachat-dialogues.txt"
LEVELS = [1, 8, 64]
SLOTS = 256  # the server's default pool: every chat stays active
SCALING = 10.0  # the target: tokens/s at the highest C over the lowest
SEED = 1000  # chat i's seed is SEED + i
OFFSET_STRIDE = 97  # chat i starts at utterance i * OFFSET_STRIDE (mod their number)
GENERATED_TOKENS = "memserve_generated_tokens_total"


# ---------------------------------------------------------------------------- results


@dataclass
class LevelRow:
    """One concurrency level: what the client measured in the window."""

    concurrency: int
    channels: int
    seconds: float  # the measuring window
    calls: int  # Generate calls that completed OK inside the window
    completion_tokens: int  # the sum of their completion_tokens
    prompt_tokens: int  # the sum of their prompt_tokens
    tokens_per_s: float  # completion_tokens / seconds
    calls_per_s: float  # calls / seconds
    ttft_us: dict[str, int]  # request sent -> first text piece: p50, p90, p99, max
    ttft_mean_us: float
    ttft_samples: int
    itl_us: dict[str, int]  # between successive text pieces of one call: p50, p90, p99, max
    itl_mean_us: float
    itl_samples: int
    call_us: dict[str, int]  # request sent -> the final message: p50, p90, p99, max
    call_mean_us: float
    finish_reasons: dict[str, int]  # of the calls counted
    errors: dict[str, int]  # status code name -> calls that failed inside the window
    client_cpu_seconds: float  # this process, over the window
    server_cpu_seconds: float  # the server and its model processes, over the window
    other_cpu_seconds: float  # every other process on the machine, over the window
    stolen_cpu_seconds: float  # of other_cpu_seconds, what the host took (/proc/stat steal)
    batching: dict[str, float] | None = None  # the server's own metrics over the window
    server_generated_tokens: float | None = None  # its memserve_generated_tokens_total, delta
    backends: dict[str, str] = field(default_factory=dict)  # model -> its step, as served
    round: int = 1

    @property
    def ok(self) -> bool:
        return not self.errors and self.calls > 0


@dataclass
class Settings:
    model: str
    seconds: float
    warmup: float
    levels: list[int]
    channels: int
    max_tokens: int
    temperature: float
    top_p: float
    max_new_tokens: int  # the server's limit
    corpus: str
    rounds: int = 1
    server_env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- inputs


def user_texts(corpus: Path) -> list[str]:
    """The first utterance of every exchange line ("N first<TAB>second"), in file order."""
    texts = []
    for line in corpus.read_text().splitlines():
        if "\t" in line:
            first = line.split(" ", 1)[1].split("\t", 1)[0].strip()
            if first:
                texts.append(first)
    if not texts:
        raise ValueError(f"no exchange lines in {corpus}")
    return texts


def server_command(model: str, max_new_tokens: int) -> list[str]:
    return [
        sys.executable, "-m", "memserve", "serve", "--models", model, "--port", "0",
        "--metrics-port", "0", "--max-new-tokens", str(max_new_tokens),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- load


class Chats(Workload):
    """Chat i (the i-th session): CreateSession with seed SEED + i, then Generate turns
    through the user texts from its own offset, each with the same sampling and seed."""

    method = "Generate"

    def __init__(self, model: str, texts: list[str], settings: Settings) -> None:
        self.model = model
        self.texts = texts
        self.settings = settings

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(model=self.model, seed=SEED + sequence)

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        turn = session.sequence * OFFSET_STRIDE + session.used
        request = memserve_pb2.GenerateRequest(
            session_id=session.session_id,
            text=self.texts[turn % len(self.texts)],
            max_tokens=self.settings.max_tokens,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=SEED + session.sequence,
        )
        stream = session.stub.Generate(request, timeout=timeout, metadata=metadata)
        return await reply_outcome(stream, BAD_RESPONSE)


async def measure_level(
    child: ChildServer,
    model: str,
    concurrency: int,
    texts: list[str],
    settings: Settings,
    round_: int = 1,
) -> LevelRow:
    """C chats for the warm-up and the window; what completed in it."""
    workload = Chats(model, texts, settings)
    recorder, usage = await run_level(child, workload, concurrency, settings, metrics=True)
    seconds = recorder.window()
    measured = usage.measured  # the CPU counters' own interval, scaled to the window
    before, after = usage.metrics_before, usage.metrics_after
    ttft, itl, call = recorder.answer_ttft, recorder.answer_itl, recorder.answer_latency
    return LevelRow(
        concurrency=concurrency,
        channels=settings.channels,
        seconds=seconds,
        calls=recorder.answered,
        completion_tokens=recorder.answered_tokens,
        prompt_tokens=recorder.answered_prompt_tokens,
        tokens_per_s=recorder.answered_tokens / seconds,
        calls_per_s=recorder.answered / seconds,
        ttft_us=ttft.microseconds(),
        ttft_mean_us=ttft.mean_microseconds,
        ttft_samples=ttft.count,
        itl_us=itl.microseconds(),
        itl_mean_us=itl.mean_microseconds,
        itl_samples=itl.count,
        call_us=call.microseconds(),
        call_mean_us=call.mean_microseconds,
        finish_reasons=dict(sorted(recorder.finish_reasons.items())),
        errors=dict(sorted(recorder.window_errors.items())),
        client_cpu_seconds=usage.client_cpu * seconds / measured,
        server_cpu_seconds=usage.server_cpu * seconds / measured,
        other_cpu_seconds=usage.other_cpu * seconds / measured,
        stolen_cpu_seconds=usage.stolen_cpu * seconds / measured,
        batching=batching_over(before, after, measured),
        backends=child.backends(),
        server_generated_tokens=(
            server_metrics.total(after, GENERATED_TOKENS)
            - server_metrics.total(before, GENERATED_TOKENS)
        ),
        round=round_,
    )


async def model_info(child: ChildServer) -> ModelInfo:
    """The one model the server serves, as its ListModels says."""
    async with AsyncClient(child.target) as client:
        listed = await client.list_models()
    if len(listed) != 1:
        raise RuntimeError(f"expected one served model, got {[m.name for m in listed]}")
    return listed[0]


async def measure_server(
    settings: Settings, texts: list[str]
) -> tuple[dict[str, Any], list[LevelRow]]:
    """Start the server, run every level against it in every round (ascending C in odd
    rounds, descending in even ones, so that a slow drift of the machine touches the
    lowest and the highest level alike), stop it."""
    rows: list[LevelRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as logs:
        command = server_command(settings.model, settings.max_new_tokens)
        child = ChildServer(command, Path(logs), env=settings.server_env)
        await asyncio.to_thread(child.start)
        try:
            info = await model_info(child)
            for round_ in range(1, settings.rounds + 1):
                order = settings.levels if round_ % 2 else settings.levels[::-1]
                for concurrency in order:
                    row = await measure_level(
                        child, info.name, concurrency, texts, settings, round_
                    )
                    rows.append(row)
                    print_level(row)
        finally:
            child.stop()
    model = {
        "spec": settings.model,
        "name": info.name,
        "type": info.type,
        "memory_shape": list(info.memory_shape),
        "state_bytes": info.state_bytes,
    }
    return model, rows


# ---------------------------------------------------------------------------- target


def compute_targets(rows: list[LevelRow]) -> dict[str, Any]:
    """Tokens/s at the highest C over the lowest, measured in one round; a level with
    errors fails the target whatever the ratio."""
    high = max(rows, key=lambda row: row.concurrency)
    low = min(rows, key=lambda row: row.concurrency)
    ratio = quotient(high.tokens_per_s, low.tokens_per_s)
    return {
        "scaling": {
            "threshold": SCALING,
            "concurrency_high": high.concurrency,
            "concurrency_low": low.concurrency,
            "tokens_per_s_high": high.tokens_per_s,
            "tokens_per_s_low": low.tokens_per_s,
            "ratio": ratio,
            "pass": ratio >= SCALING and high.ok and low.ok,
        }
    }


def decide_targets(
    rows: list[LevelRow], rounds: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The target per round (`compute_targets`), decided on the median over the rounds;
    returns the verdict and the per-round targets."""
    per_round = [
        compute_targets([row for row in rows if row.round == n]) for n in range(1, rounds + 1)
    ]
    high = max(row.concurrency for row in rows)
    low = min(row.concurrency for row in rows)
    compared = [row for row in rows if row.concurrency in (high, low)]
    scaling = median_verdict(
        SCALING,
        [targets["scaling"]["ratio"] for targets in per_round],
        all(row.ok for row in compared),
    )
    return {"scaling": {"concurrency_high": high, "concurrency_low": low, **scaling}}, per_round


# ---------------------------------------------------------------------------- output


def milliseconds(value: float) -> float:
    return value / 1e3


def print_level(row: LevelRow) -> None:
    batch = (row.batching or {}).get("mean_batch_size", float("nan"))
    errors = "" if row.ok else f"  ERRORS {row.errors or 'no calls'}"
    print(
        f"C={row.concurrency:<4} {row.tokens_per_s:>9.1f} tokens/s {row.calls_per_s:>7.2f} calls/s"
        f"  ttft p50 {milliseconds(row.ttft_us['p50']):8.2f} ms"
        f" p99 {milliseconds(row.ttft_us['p99']):8.2f} ms"
        f"  itl p50 {milliseconds(row.itl_us['p50']):7.2f} ms"
        f" p99 {milliseconds(row.itl_us['p99']):7.2f} ms"
        f"  batch {batch:6.1f}  cpu client {row.client_cpu_seconds / row.seconds:4.2f}"
        f" server {row.server_cpu_seconds / row.seconds:4.2f}"
        f" other {row.other_cpu_seconds / row.seconds:4.2f}"
        f" (stolen {row.stolen_cpu_seconds / row.seconds:4.2f}){errors}",
        flush=True,
    )


def print_table(rows: list[LevelRow], targets: dict[str, Any]) -> None:
    print("\nGenerate over loopback, median over rounds (latencies in ms)")
    print(
        f"{'C':>4} | {'tokens/s':>9} {'calls/s':>8} | {'ttft p50':>8} {'p99':>8} | "
        f"{'itl p50':>7} {'p99':>7} | {'batch':>6} | {'cpu cli':>7} {'srv':>5} {'oth':>5}"
    )
    for concurrency in sorted({row.concurrency for row in rows}):
        level = [row for row in rows if row.concurrency == concurrency]

        def med(read: Callable[[LevelRow], float], level: list[LevelRow] = level) -> float:
            return median_of([read(row) for row in level])

        batch = med(lambda row: (row.batching or {}).get("mean_batch_size", float("nan")))
        flag = "" if all(row.ok for row in level) else "  ERRORS"
        print(
            f"{concurrency:>4} | {med(lambda r: r.tokens_per_s):>9.1f} "
            f"{med(lambda r: r.calls_per_s):>8.2f} | "
            f"{milliseconds(med(lambda r: r.ttft_us['p50'])):>8.2f} "
            f"{milliseconds(med(lambda r: r.ttft_us['p99'])):>8.2f} | "
            f"{milliseconds(med(lambda r: r.itl_us['p50'])):>7.2f} "
            f"{milliseconds(med(lambda r: r.itl_us['p99'])):>7.2f} | {batch:>6.1f} | "
            f"{med(lambda r: r.client_cpu_seconds / r.seconds):>7.2f} "
            f"{med(lambda r: r.server_cpu_seconds / r.seconds):>5.2f} "
            f"{med(lambda r: r.other_cpu_seconds / r.seconds):>5.2f}{flag}"
        )
    scaling = targets["scaling"]
    rounds = " ".join(f"{ratio:.2f}x" for ratio in scaling["rounds"])
    print("\ntarget (the ratio per round, decided on the median)")
    print(
        f"  tokens/s C={scaling['concurrency_high']} / C={scaling['concurrency_low']}: "
        f"median {scaling['median']:.2f}x (>= {SCALING:g}x: {verdict(scaling['pass'])}); "
        f"rounds {rounds}"
    )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=MODEL, help="bundled model name or checkpoint directory (a VMED)"
    )
    parser.add_argument("--levels", type=int, nargs="+", default=LEVELS, help="concurrent chats C")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per level")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every call")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every level, in alternating order; the target is decided on the median",
    )
    parser.add_argument("--channels", type=int, default=1, help="client channels (round robin)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the Persona-Chat text file")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: bench/results/generation-cpu.json)"
    )
    parser.add_argument(
        "--server-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="extra environment for the memserve child (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    args = parser.parse_args(argv)
    if any(c < 1 or c > SLOTS for c in args.levels):
        parser.error(f"--levels must be between 1 and {SLOTS} (the server's slots)")
    if args.seconds <= 0 or args.warmup < 0 or args.channels < 1 or args.rounds < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --channels >= 1 and --rounds >= 1")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    args.server_env = server_env(parser, args.server_env)
    args.levels = sorted(set(args.levels))
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    from models import checkpoint

    try:
        checkpoint.resolve(args.model)
    except checkpoint.CheckpointError as error:
        print(f"bench/generation.py: --model: {error}", file=sys.stderr)
        return 2
    settings = Settings(
        model=str(args.model),
        seconds=args.seconds,
        warmup=args.warmup,
        levels=args.levels,
        channels=args.channels,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max(256, args.max_tokens),
        corpus=str(args.corpus),
        rounds=args.rounds,
        server_env=args.server_env,
    )
    texts = user_texts(args.corpus)
    print(
        f"device: {cpu_name()}, {os.cpu_count()} cores; model {settings.model}, torch "
        f"reference kernels; {len(texts)} user texts; max_tokens {settings.max_tokens}"
    )
    model, rows = asyncio.run(measure_server(settings, texts))
    targets, per_round = decide_targets(rows, settings.rounds)
    print_table(rows, targets)

    result = {
        **provenance("generation", "bench/generation.py", argv),
        "model": model,
        "settings": {
            **asdict(settings),
            "kernel_backend_setting": KERNEL_BACKEND,  # MEMSERVE_KERNEL_BACKEND; rows: what served
            "slots": SLOTS,
            "user_texts": len(texts),
            "seeds": f"chat i: CreateSession and every GenerateRequest seed = {SEED} + i",
            "offsets": f"chat i starts at user text i * {OFFSET_STRIDE} and cycles",
            "server_command": server_command(settings.model, settings.max_new_tokens)[1:],
            "client": "this process: grpc.aio, one task per chat, channels round robin",
        },
        "levels": [{**asdict(row), "ok": row.ok} for row in rows],
        "targets": targets,
        "rounds": per_round,
    }
    write_record(result, args.out or ROOT / "bench" / "results" / "generation-cpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the gRPC server over loopback: session-steps/s and latency against the ceiling.

With the bundled model `ntm-copy` and the PyTorch reference kernels, over `--rounds` rounds:

1. in-process: `model.step(pool, slots, inputs)` over a pool of 256 slots for each batch
   size B, median seconds per step after a warm-up, as session-steps/s = B / seconds;
2. server: a real `memserve serve` in a child process, driven by C concurrent client
   sessions (CreateSession, calls for the warm-up and the measuring window, DeleteSession)
   in three call shapes: unary Step with T=1, StepStream (one stream per session, one
   step per message) with T=1, and unary Step with T=20 (a whole copy sequence per call);
3. echo: a do-nothing grpc.aio server (this file, `--echo-server PORT`, another child)
   that answers Step and StepStream at once with a precomputed response of the real size
   ([T, 8] float32): the ceiling Python gRPC sets on this machine for the same call shape.

Both servers run for the whole benchmark. Each round times the in-process step, then every
(shape, C) against the echo server and the real server back to back (the echo first in odd
rounds, the server first in even ones), so that a slow drift of a shared machine touches a
server and its references alike. Each target is computed per round from that round's
numbers, and decided on the median over the rounds: single runs of the same code on a
shared virtual machine differ too much to decide on (docs/performance.md says by how much).

The load client is this process: `memserve loadgen`'s closed loop, recorder and scraper
(clients/loadgen/) with a session per worker, made before the warm-up, over `--channels`
plain grpc.aio channels; a call that fails retires its session for a fresh one. A call
counts if it completes OK inside the window. It prints a table of medians and the targets,
and writes every round's numbers as JSON (default bench/results/serving-cpu.json). Latency
percentiles come from HdrHistogram; errors are counted by status code, and a level with
errors says so.

    python bench/serving.py                    # the full run (how long: docs/performance.md)
    python bench/serving.py --rounds 1 --levels 1 16 256 --seconds 5 --batches 1 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose serving.py is this file

from bench.child_server import KERNEL_BACKEND, ChildServer  # noqa: E402
from clients.channel import Metadata  # noqa: E402
from clients.loadgen import server_metrics  # noqa: E402
from clients.loadgen.connection import Connection  # noqa: E402
from clients.loadgen.recording import Outcome, Recorder  # noqa: E402
from clients.loadgen.schedule import Level, Plan, Session, closed_loop  # noqa: E402
from clients.loadgen.workload import Workload, step_outcome  # noqa: E402
from clients.loadgen.workloads import GrpcTarget  # noqa: E402
from protos import memserve_pb2, memserve_pb2_grpc, tensors  # noqa: E402

MODEL = "ntm-copy"
POOL_SLOTS = 256  # the server's default `slots`, and the in-process pool
POWERS_OF_TWO = [2**k for k in range(9)]  # 1 .. 256
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # as serving.server
CONNECT_SECONDS = 30.0
BAD_RESPONSE = "BAD_RESPONSE"  # an OK answer of the wrong size


@dataclass(frozen=True)
class Shape:
    """One way of calling the server: the RPC and the steps T each call carries."""

    name: str
    method: str  # "Step" (unary) or "StepStream" (one bidi stream per session)
    steps: int


SHAPES = (
    Shape("unary_t1", "Step", 1),
    Shape("stream_t1", "StepStream", 1),
    Shape("unary_t20", "Step", 20),
)
# The targets.
ECHO_FRACTION = 0.7  # T=1: server session-steps/s over the echo's, same call shape
IN_PROCESS_FRACTION = 0.5  # T=20 at the top C: server over in-process at the top B
SCALING = 10.0  # each shape: server at the top C over the server at the lowest C


# ---------------------------------------------------------------------------- results


@dataclass
class InProcessRow:
    """The model's batched step timed in this process."""

    batch: int
    samples: int
    seconds_per_step: float  # median
    session_steps_per_s: float  # batch / seconds_per_step
    round: int = 1
    backend: str = ""  # what stepped it: "fused-cpu", "torch", "triton"


@dataclass
class LevelRow:
    """One (target, shape, concurrency): what the client measured in the window."""

    target: str  # "server" or "echo"
    shape: str
    method: str
    steps_per_call: int
    concurrency: int
    channels: int
    seconds: float  # the measuring window, as timed
    calls: int  # calls that completed OK inside the window
    session_steps: int  # calls * steps_per_call
    calls_per_s: float
    session_steps_per_s: float  # session_steps / seconds
    latency_us: dict[str, int]  # per call: p50, p90, p99, max (HdrHistogram, 3 digits)
    latency_mean_us: float
    errors: dict[str, int]  # status code name -> calls that failed inside the window
    client_cpu_seconds: float  # this process, over the window
    server_cpu_seconds: float  # the server and its model processes, over the window
    other_cpu_seconds: float  # every other process on the machine, over the window
    stolen_cpu_seconds: float  # of other_cpu_seconds, what the host took (/proc/stat steal)
    batching: dict[str, float] | None = None  # the real server's own metrics over the window
    backends: dict[str, str] = field(default_factory=dict)  # model -> its step, as served
    round: int = 1

    @property
    def ok(self) -> bool:
        return not self.errors and self.calls > 0


@dataclass
class Settings:
    seconds: float
    warmup: float
    levels: list[int]
    batches: list[int]
    channels: int
    step_seconds: float
    rounds: int = 1
    server_env: dict[str, str] = field(default_factory=dict)
    shapes: list[str] = field(default_factory=lambda: [s.name for s in SHAPES])


# ---------------------------------------------------------------------------- in-process


@contextlib.contextmanager
def torch_backend() -> Iterator[None]:
    """Force the PyTorch reference kernels for a while, as the benchmarks' servers do (the
    fused CPU step, where a compiler built it, serves an NTM or a DNC all the same)."""
    saved = os.environ.get("MEMSERVE_KERNEL_BACKEND")
    os.environ["MEMSERVE_KERNEL_BACKEND"] = KERNEL_BACKEND
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MEMSERVE_KERNEL_BACKEND"]
        else:
            os.environ["MEMSERVE_KERNEL_BACKEND"] = saved


def measure_in_process(batches: list[int], budget_s: float, round_: int = 1) -> list[InProcessRow]:
    """Median seconds of `model.step` at each batch size over a full pool of 256 slots."""
    import torch

    from kernels.backend import retain_freed_memory
    from models import checkpoint
    from models.controller import ControllerMemoryModel
    from models.fused import fused_step

    retain_freed_memory()  # as the server's model process does
    model = checkpoint.load(MODEL)
    pool = model.new_pool(POOL_SLOTS)
    model.reset(pool, range(POOL_SLOTS))
    generator = torch.Generator().manual_seed(0)
    rows: list[InProcessRow] = []
    with torch_backend():
        fused = isinstance(model, ControllerMemoryModel) and fused_step(model, pool) is not None
        backend = "fused-cpu" if fused else "torch"
        for batch in batches:
            slots = torch.randperm(POOL_SLOTS, generator=generator)[:batch].to(torch.int64)
            bits = torch.rand(batch, model.input_size, generator=generator) > 0.5
            inputs = bits.float()
            inputs[:, -1] = 0.0  # the delimiter channel, as in the copy task's input phase
            for _ in range(3):
                model.step(pool, slots, inputs)
            samples: list[float] = []
            deadline = time.perf_counter() + budget_s
            while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 1000):
                start = time.perf_counter()
                model.step(pool, slots, inputs)
                samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            rows.append(
                InProcessRow(batch, len(samples), seconds, batch / seconds, round_, backend)
            )
    return rows


# ---------------------------------------------------------------------------- child servers


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the machine has been busy since boot, and the part of them a hypervisor
    took for other guests ("steal"), from /proc/stat. The busy seconds count steal, so
    `other` CPU below includes it; `stolen` says how much of it was the host's."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return float("nan"), float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    busy = user + nice + system + irq + softirq + steal
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, steal / tick


@dataclass(frozen=True)
class WindowUsage:
    """CPU seconds and the server's metrics over a measuring window."""

    measured: float  # seconds between the two CPU readings (scale to the window with it)
    client_cpu: float  # this process
    server_cpu: float  # the server child
    other_cpu: float  # everything else on the machine
    stolen_cpu: float  # the part of other_cpu that the host took for other guests
    metrics_before: server_metrics.Samples
    metrics_after: server_metrics.Samples


async def watch_window(child: ChildServer, level: Level, metrics: bool) -> WindowUsage:
    """Read CPU counters (and the server's metrics, if `metrics`) when the level's window
    opens and when it closes."""

    async def scrape() -> server_metrics.Samples:
        if not metrics:
            return {}
        return await asyncio.to_thread(server_metrics.scrape, child.metrics_url)

    await level.opened.wait()
    before = await scrape()
    client, server, (machine, stolen) = (
        time.process_time(),
        child.cpu_seconds(),
        machine_cpu_seconds(),
    )
    opened = time.perf_counter()
    await level.closed.wait()
    closed = time.perf_counter()
    client = time.process_time() - client
    server = child.cpu_seconds() - server
    machine_after, stolen_after = machine_cpu_seconds()
    machine, stolen = machine_after - machine, stolen_after - stolen
    return WindowUsage(closed - opened, client, server, machine - client - server, stolen,
                       before, await scrape())  # fmt: skip


class LevelTiming(Protocol):
    """What `run_level` needs of a benchmark's settings."""

    channels: int  # client channels, sessions round robin over them
    warmup: float
    seconds: float  # the measuring window


async def run_level(
    child: ChildServer,
    workload: Workload,
    concurrency: int,
    settings: LevelTiming,
    metrics: bool,
    protocol: str = "memserve",
) -> tuple[Recorder, WindowUsage]:
    """C sessions, made first, each calling back to back (the load generator's closed loop,
    one session per worker) for the warm-up and the window, then deleted; what the level
    recorded, and the CPU and the server's metrics over its window. A call that fails
    retires its session (a fresh one replaces it). `protocol`: memserve.v1, or "kserve"
    (the v2 API's stubs, for bench/kserve.py)."""
    connection = Connection(child.target, settings.channels, protocol=protocol)  # plain channels
    try:
        await connection.connect(CONNECT_SECONDS)
        recorder = Recorder(workload.method)
        level = Level(f"C={concurrency}", recorder, asyncio.Event())
        target = GrpcTarget(connection, workload, recorder, timeout=None)
        await target.prepare(concurrency)
        watcher = asyncio.create_task(watch_window(child, level, metrics))
        plan = Plan(warmup=settings.warmup, duration=settings.seconds, requests=None,
                    requests_per_session=sys.maxsize)  # fmt: skip
        await closed_loop(target, plan, level, concurrency)
        usage = await watcher
    finally:
        await connection.close()
    return recorder, usage


def server_command(metrics: bool) -> list[str]:
    return [
        sys.executable, "-m", "memserve", "serve", "--models", MODEL, "--port", "0",
        "--metrics-port", "0" if metrics else "-1",
    ]  # fmt: skip


def echo_command() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--echo-server", "0"]


# ---------------------------------------------------------------------------- echo server


class EchoService(memserve_pb2_grpc.MemServeServicer):
    """Answers Step and StepStream at once with a precomputed response of the real size."""

    def __init__(self, output_size: int) -> None:
        self.output_size = output_size
        self.responses: dict[int, memserve_pb2.StepResponse] = {}
        self.sessions = 0

    def response(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        steps = request.inputs.shape[0] if request.inputs.shape else 1
        response = self.responses.get(steps)
        if response is None:
            outputs = np.random.default_rng(steps).random((steps, self.output_size))
            response = memserve_pb2.StepResponse(
                outputs=tensors.encode(outputs.astype(np.float32)), step=steps
            )
            self.responses[steps] = response
        return response

    async def CreateSession(  # noqa: N802
        self, request: memserve_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        self.sessions += 1
        return memserve_pb2.SessionInfo(session_id=f"echo-{self.sessions}", model=request.model)

    async def DeleteSession(  # noqa: N802
        self, request: memserve_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.DeleteSessionResponse:
        return memserve_pb2.DeleteSessionResponse()

    async def Step(  # noqa: N802
        self, request: memserve_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.StepResponse:
        return self.response(request)

    async def StepStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[memserve_pb2.StepRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[memserve_pb2.StepResponse]:
        async for request in request_iterator:
            yield self.response(request)


async def serve_echo(port: int, output_size: int) -> None:
    """Run the echo server on 127.0.0.1:`port` (0: any free port) until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    memserve_pb2_grpc.add_MemServeServicer_to_server(EchoService(output_size), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    print(json.dumps({"event": "serving", "port": bound}), file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0.5)


# ---------------------------------------------------------------------------- load


class StepCalls(Workload):
    """A call shape as the load generator's workload: each session sends the same
    copy-task-like input (random bits, the delimiter channel zero; seeded by the session's
    number) as unary Step calls, or as one StepStream per session, a message per step."""

    def __init__(self, shape: Shape, input_size: int, output_size: int) -> None:
        self.shape = shape
        self.method = shape.method
        self.input_size = input_size
        self.output_size = output_size
        self.requests: dict[str, memserve_pb2.StepRequest] = {}

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(model=MODEL)

    def request(self, session: Session) -> memserve_pb2.StepRequest:
        request = self.requests.get(session.session_id)
        if request is None:
            bits = (
                np.random.default_rng(session.sequence).random((self.shape.steps, self.input_size))
                > 0.5
            )
            inputs = bits.astype(np.float32)
            inputs[:, -1] = 0.0
            request = memserve_pb2.StepRequest(
                session_id=session.session_id, inputs=tensors.encode(inputs)
            )
            self.requests[session.session_id] = request
        return request

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        request = self.request(session)
        if self.shape.method == "Step":
            response = await session.stub.Step(request, timeout=timeout, metadata=metadata)
        else:
            if session.stream is None:
                session.stream = session.stub.StepStream(timeout=timeout, metadata=metadata)
            await session.stream.write(request)
            response = await session.stream.read()
            if response is grpc.aio.EOF:
                return Outcome("EOF", time.perf_counter())
        return step_outcome(response, self.shape.steps, self.output_size, BAD_RESPONSE)

    async def release(self, session: Session) -> None:
        stream, session.stream = session.stream, None
        if stream is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stream.done_writing()
                await stream.code()


def batching_over(
    before: server_metrics.Samples, after: server_metrics.Samples, seconds: float
) -> dict[str, float]:
    """What the server's own metrics say about a window: launches, batch sizes, step time."""

    def delta(name: str) -> float:
        return server_metrics.total(after, name) - server_metrics.total(before, name)

    launches = delta("memserve_batch_size_count")
    queue_waits = delta("memserve_queue_wait_seconds_count")
    result = {
        "launches": launches,
        "launches_per_s": launches / seconds,
        "mean_batch_size": delta("memserve_batch_size_sum") / launches if launches else 0.0,
        "mean_step_seconds": (
            delta("memserve_step_duration_seconds_sum") / launches if launches else 0.0
        ),
        "step_busy_fraction": delta("memserve_step_duration_seconds_sum") / seconds,
        "mean_queue_wait_seconds": (
            delta("memserve_queue_wait_seconds_sum") / queue_waits if queue_waits else 0.0
        ),
    }
    # Launches per batch-size bucket (cumulative counts turned into per-bucket counts).
    later = server_metrics.buckets(after, "memserve_batch_size")
    earlier = server_metrics.buckets(before, "memserve_batch_size")
    previous = 0.0
    for bound in sorted(later, key=float):
        cumulative = later[bound] - earlier.get(bound, 0.0)
        result[f"launches_batch_le_{bound}"] = cumulative - previous
        previous = cumulative
    return result


async def measure_level(
    child: ChildServer,
    target_name: str,
    shape: Shape,
    concurrency: int,
    settings: LevelTiming,
    input_size: int,
    output_size: int,
    round_: int = 1,
    workload_class: type[StepCalls] | None = None,
) -> LevelRow:
    """C sessions calling in `shape` for the warm-up and the window; what completed in it.
    `workload_class`: the workload's (default `StepCalls`)."""
    scraping = child.metrics_port >= 0
    workload = (workload_class or StepCalls)(shape, input_size, output_size)
    recorder, usage = await run_level(child, workload, concurrency, settings, scraping)
    seconds = recorder.window()
    batching = (
        batching_over(usage.metrics_before, usage.metrics_after, usage.measured)
        if scraping
        else None
    )
    calls = recorder.answered
    return LevelRow(
        target=target_name,
        shape=shape.name,
        method=shape.method,
        steps_per_call=shape.steps,
        concurrency=concurrency,
        channels=settings.channels,
        seconds=seconds,
        calls=calls,
        session_steps=calls * shape.steps,
        calls_per_s=calls / seconds,
        session_steps_per_s=calls * shape.steps / seconds,
        latency_us=recorder.answer_latency.microseconds(),
        latency_mean_us=recorder.answer_latency.mean_microseconds,
        errors=dict(sorted(recorder.window_errors.items())),
        client_cpu_seconds=usage.client_cpu * seconds / usage.measured,
        server_cpu_seconds=usage.server_cpu * seconds / usage.measured,
        other_cpu_seconds=usage.other_cpu * seconds / usage.measured,
        stolen_cpu_seconds=usage.stolen_cpu * seconds / usage.measured,
        batching=batching,
        backends=child.backends(),
        round=round_,
    )


async def measure_rounds(
    settings: Settings, input_size: int, output_size: int
) -> tuple[list[LevelRow], list[InProcessRow]]:
    """Every round: the in-process step, then each (shape, C) on the echo server and on
    the real server back to back, in alternating order; both servers run throughout."""
    rows: list[LevelRow] = []
    in_process: list[InProcessRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as logs:
        echo = ChildServer(echo_command(), Path(logs), name="echo")
        server = ChildServer(server_command(True), Path(logs), env=settings.server_env)
        started: list[ChildServer] = []
        try:
            for child in (echo, server):
                await asyncio.to_thread(child.start)
                started.append(child)
            for round_ in range(1, settings.rounds + 1):
                timed = measure_in_process(settings.batches, settings.step_seconds, round_)
                for step in timed:
                    print(
                        f"round {round_} in-process B={step.batch:<4} "
                        f"{step.session_steps_per_s:>10.1f} session-steps/s",
                        flush=True,
                    )
                in_process += timed
                pair = (echo, server) if round_ % 2 else (server, echo)
                for shape in SHAPES:
                    for concurrency in settings.levels:
                        for child in pair:
                            row = await measure_level(
                                child, child.name, shape, concurrency, settings,
                                input_size, output_size, round_,
                            )  # fmt: skip
                            rows.append(row)
                            print_level(row)
        finally:
            for child in started:
                child.stop()
    return rows, in_process


# ---------------------------------------------------------------------------- targets


def find(
    rows: list[LevelRow], target: str, shape: str, concurrency: int, round_: int | None = None
) -> LevelRow:
    """The row of (target, shape, C), of one round if `round_` is given."""
    return next(
        r
        for r in rows
        if (r.target, r.shape, r.concurrency) == (target, shape, concurrency)
        and (round_ is None or r.round == round_)
    )


def quotient(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when a level completed no calls (its rate is 0): the
    record still gets written, with that level's errors, instead of the run crashing."""
    return numerator / denominator if denominator else float("nan")


def compute_targets(
    rows: list[LevelRow], in_process: list[InProcessRow], settings: Settings
) -> dict[str, Any]:
    """The issue's three targets as ratios of numbers measured in this run, pass or fail.

    A comparison that involves a level with errors fails, whatever its ratio."""
    top, bottom = max(settings.levels), min(settings.levels)
    targets: dict[str, Any] = {}

    echo: dict[str, Any] = {}
    for shape in ("unary_t1", "stream_t1"):
        per_level: list[dict[str, Any]] = []
        for concurrency in settings.levels:
            server = find(rows, "server", shape, concurrency)
            ceiling = find(rows, "echo", shape, concurrency)
            ratio = quotient(server.session_steps_per_s, ceiling.session_steps_per_s)
            per_level.append(
                {
                    "concurrency": concurrency,
                    "server_session_steps_per_s": server.session_steps_per_s,
                    "echo_session_steps_per_s": ceiling.session_steps_per_s,
                    "ratio": ratio,
                    "pass": ratio >= ECHO_FRACTION and server.ok and ceiling.ok,
                }
            )
        best = max(per_level, key=lambda level: level["server_session_steps_per_s"])
        echo_best = max(per_level, key=lambda level: level["echo_session_steps_per_s"])
        peak_ratio = quotient(
            best["server_session_steps_per_s"], echo_best["echo_session_steps_per_s"]
        )
        echo[shape] = {
            "threshold": ECHO_FRACTION,
            "per_level": per_level,
            "levels_passing": sum(level["pass"] for level in per_level),
            "server_best_concurrency": best["concurrency"],
            "ratio_at_server_best_concurrency": best["ratio"],
            "echo_best_concurrency": echo_best["concurrency"],
            "server_best_over_echo_best": peak_ratio,
            "pass": peak_ratio >= ECHO_FRACTION and all(r.ok for r in rows if r.shape == shape),
        }
    targets["t1_vs_echo"] = echo

    long_calls = find(rows, "server", "unary_t20", top)
    biggest = max(in_process, key=lambda row: row.batch)
    ratio = quotient(long_calls.session_steps_per_s, biggest.session_steps_per_s)
    targets["t20_vs_in_process"] = {
        "threshold": IN_PROCESS_FRACTION,
        "concurrency": top,
        "batch": biggest.batch,
        "server_session_steps_per_s": long_calls.session_steps_per_s,
        "in_process_session_steps_per_s": biggest.session_steps_per_s,
        "ratio": ratio,
        "pass": ratio >= IN_PROCESS_FRACTION and long_calls.ok,
    }

    scaling: dict[str, Any] = {}
    for name in (shape.name for shape in SHAPES):
        high, low = find(rows, "server", name, top), find(rows, "server", name, bottom)
        echo_high, echo_low = find(rows, "echo", name, top), find(rows, "echo", name, bottom)
        ratio = quotient(high.session_steps_per_s, low.session_steps_per_s)
        scaling[name] = {
            "threshold": SCALING,
            "concurrency_high": top,
            "concurrency_low": bottom,
            "server_high_session_steps_per_s": high.session_steps_per_s,
            "server_low_session_steps_per_s": low.session_steps_per_s,
            "ratio": ratio,
            "pass": ratio >= SCALING and high.ok and low.ok,
            "echo_ratio": quotient(echo_high.session_steps_per_s, echo_low.session_steps_per_s),
        }
    targets["scaling"] = scaling
    return targets


def median_verdict(threshold: float, ratios: list[float], ok: bool) -> dict[str, Any]:
    """A target decided on the median of its per-round ratios; `ok`: no level it compares
    had errors in any round (else it fails, with no median)."""
    median = statistics.median(ratios) if ok else float("nan")
    return {"threshold": threshold, "median": median, "rounds": ratios,
            "pass": ok and median >= threshold}  # fmt: skip


def decide_targets(
    rows: list[LevelRow], in_process: list[InProcessRow], settings: Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each target computed per round (`compute_targets`), and decided on the median of
    its ratio over the rounds; a target whose levels had errors in any round fails.
    Returns the verdicts and the per-round targets."""
    rounds = [
        compute_targets(
            [row for row in rows if row.round == n],
            [row for row in in_process if row.round == n],
            settings,
        )
        for n in range(1, settings.rounds + 1)
    ]
    top, bottom = max(settings.levels), min(settings.levels)

    def verdict_of(threshold: float, ratios: list[float], levels: list[LevelRow]) -> dict[str, Any]:
        return median_verdict(threshold, ratios, all(row.ok for row in levels))

    targets: dict[str, Any] = {"t1_vs_echo": {}, "scaling": {}}
    for shape in ("unary_t1", "stream_t1"):
        targets["t1_vs_echo"][shape] = verdict_of(
            ECHO_FRACTION,
            [r["t1_vs_echo"][shape]["server_best_over_echo_best"] for r in rounds],
            [row for row in rows if row.shape == shape],
        )
    targets["t20_vs_in_process"] = verdict_of(
        IN_PROCESS_FRACTION,
        [r["t20_vs_in_process"]["ratio"] for r in rounds],
        [row for row in rows if (row.target, row.shape, row.concurrency)
         == ("server", "unary_t20", top)],
    )  # fmt: skip
    for shape in (shape.name for shape in SHAPES):
        targets["scaling"][shape] = verdict_of(
            SCALING,
            [r["scaling"][shape]["ratio"] for r in rounds],
            [row for row in rows if row.target == "server" and row.shape == shape
             and row.concurrency in (top, bottom)],
        )  # fmt: skip
    return targets, rounds


# ---------------------------------------------------------------------------- output


def print_level(row: LevelRow) -> None:
    batching = row.batching or {}
    cpu_per_call = row.server_cpu_seconds / row.calls * 1e6 if row.calls else float("nan")
    extra = f" server cpu/call {cpu_per_call:7.1f} us"
    if batching:
        extra += f" batch {batching['mean_batch_size']:6.1f}"
        extra += f" step {batching['mean_step_seconds'] * 1e3:6.2f} ms"
    errors = "" if row.ok else f"  ERRORS {row.errors or 'no calls'}"
    print(
        f"round {row.round} {row.target:>6} {row.shape:>9} C={row.concurrency:<4} "
        f"{row.session_steps_per_s:>10.1f} steps/s {row.calls_per_s:>9.1f} calls/s  "
        f"p50 {row.latency_us['p50'] / 1e3:8.2f} ms  p99 {row.latency_us['p99'] / 1e3:8.2f} ms  "
        f"cpu client {row.client_cpu_seconds / row.seconds:4.2f} "
        f"server {row.server_cpu_seconds / row.seconds:4.2f} "
        f"other {row.other_cpu_seconds / row.seconds:4.2f} "
        f"(stolen {row.stolen_cpu_seconds / row.seconds:4.2f}){extra}{errors}",
        flush=True,
    )


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def latency_columns(rows: list[LevelRow]) -> str:
    """Median session-steps/s, p50 and p99 (ms) of one target's rounds at one level."""
    rate = median_of([row.session_steps_per_s for row in rows])
    p50 = median_of([row.latency_us["p50"] for row in rows]) / 1e3
    p99 = median_of([row.latency_us["p99"] for row in rows]) / 1e3
    return f"{rate:>9.1f} {p50:>7.2f} {p99:>7.2f}"


def print_table(
    rows: list[LevelRow], in_process: list[InProcessRow], targets: dict[str, Any]
) -> None:
    """Medians over the rounds, then the targets with every round's ratio."""
    print("\nin-process model.step (torch reference, pool of 256 slots), median over rounds")
    print(f"{'B':>5} {'us/step':>10} {'session-steps/s':>16}")
    for batch in sorted({step.batch for step in in_process}):
        steps = [step for step in in_process if step.batch == batch]
        seconds = median_of([step.seconds_per_step for step in steps])
        rate = median_of([step.session_steps_per_s for step in steps])
        print(f"{batch:>5} {seconds * 1e6:>10.1f} {rate:>16.1f}")
    print(
        "\nserver vs echo over loopback, median over rounds (session-steps/s; latency per "
        "call p50 / p99 in ms; ratio: median of the rounds' server / echo)"
    )
    print(
        f"{'shape':>9} {'C':>4} | {'server':>9} {'p50':>7} {'p99':>7} | "
        f"{'echo':>9} {'p50':>7} {'p99':>7} | {'ratio':>5} {'batch':>5}"
    )
    for shape in (shape.name for shape in SHAPES):
        for concurrency in sorted({row.concurrency for row in rows}):
            level = [r for r in rows if (r.shape, r.concurrency) == (shape, concurrency)]
            if not level:
                continue
            server = [r for r in level if r.target == "server"]
            echo = [r for r in level if r.target == "echo"]
            ratios = [
                quotient(row.session_steps_per_s, find(echo, "echo", shape, concurrency,
                                                       row.round).session_steps_per_s)
                for row in server
            ]  # fmt: skip
            mean_batch = median_of(
                [(row.batching or {}).get("mean_batch_size", float("nan")) for row in server]
            )
            flag = "" if all(row.ok for row in level) else "  ERRORS"
            print(
                f"{shape:>9} {concurrency:>4} | {latency_columns(server)} | "
                f"{latency_columns(echo)} | {median_of(ratios):>5.2f} {mean_batch:>5.1f}{flag}"
            )

    def line(name: str, result: dict[str, Any], threshold: str) -> None:
        rounds = " ".join(f"{ratio:.3f}" for ratio in result["rounds"])
        print(
            f"  {name}: median {result['median']:.3f} ({threshold}: {verdict(result['pass'])}); "
            f"rounds {rounds}"
        )

    print("\ntargets (each ratio per round, decided on the median)")
    for shape, result in targets["t1_vs_echo"].items():
        line(f"{shape} server best C / echo best C", result, f">= {ECHO_FRACTION}")
    top = max(row.concurrency for row in rows)
    biggest = max(step.batch for step in in_process)
    line(
        f"unary_t20 at C={top} / in-process B={biggest}",
        targets["t20_vs_in_process"],
        f">= {IN_PROCESS_FRACTION}",
    )
    bottom = min(row.concurrency for row in rows)
    for shape, result in targets["scaling"].items():
        line(f"{shape} server C={top} / C={bottom}", result, f">= {SCALING:g}x")


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_state() -> dict[str, Any]:
    """The commit measured, and the paths that differed from it (the server runs this tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    # Porcelain lines are "XY PATH": the status columns may be spaces, so no strip() first.
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip(), "changed": changed}


def versions() -> dict[str, str]:
    import torch
    from google.protobuf import __version__ as protobuf_version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "numpy": np.__version__,
    }


def provenance(benchmark: str, script: str, argv: Sequence[str]) -> dict[str, Any]:
    """What every benchmark record starts with: what ran, when, where, on which versions."""
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", script, *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "cores": os.cpu_count(),
        "versions": versions(),
        "git": git_state(),
    }


def write_record(record: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------- main


def server_env(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """`--server-env NAME=VALUE` options (repeatable) as the server's extra environment."""
    if any("=" not in item for item in items):
        parser.error("--server-env takes NAME=VALUE")
    return dict(item.split("=", 1) for item in items)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    parser.add_argument(
        "--levels", type=int, nargs="+", default=POWERS_OF_TWO, help="concurrent sessions C"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=POWERS_OF_TWO, help="in-process batch sizes B"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every measurement, interleaved; targets are decided on the median",
    )
    parser.add_argument("--channels", type=int, default=1, help="client channels (round robin)")
    parser.add_argument(
        "--step-seconds", type=float, default=1.0, help="timing budget per in-process B"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: bench/results/serving-cpu.json)"
    )
    parser.add_argument(
        "--server-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="extra environment for the memserve child (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument(
        "--device", help="the server's --device (auto, cpu, cuda); default: the server's own"
    )
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(c < 1 or c > POOL_SLOTS for c in args.levels):
        parser.error(f"--levels must be between 1 and {POOL_SLOTS} (the server's slots)")
    if any(b < 1 or b > POOL_SLOTS for b in args.batches):
        parser.error(f"--batches must be between 1 and {POOL_SLOTS} (the pool's slots)")
    if args.seconds <= 0 or args.warmup < 0 or args.channels < 1 or args.rounds < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --channels >= 1 and --rounds >= 1")
    args.server_env = server_env(parser, args.server_env)
    if args.device is not None:  # as `memserve serve --device`, which reads this variable
        args.server_env["MEMSERVE_DEVICE"] = args.device
    args.levels = sorted(set(args.levels))
    args.batches = sorted(set(args.batches))
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    if args.echo_server is not None:
        asyncio.run(serve_echo(args.echo_server, output_size=8))
        return 0
    settings = Settings(
        seconds=args.seconds,
        warmup=args.warmup,
        levels=args.levels,
        batches=args.batches,
        channels=args.channels,
        step_seconds=args.step_seconds,
        rounds=args.rounds,
        server_env=args.server_env,
    )
    from models import checkpoint

    model = checkpoint.load(MODEL)
    input_size, output_size = model.input_size, model.output_size
    print(f"device: {cpu_name()}, {os.cpu_count()} cores; model {MODEL}, torch reference kernels")
    rows, in_process = asyncio.run(measure_rounds(settings, input_size, output_size))
    targets, per_round = decide_targets(rows, in_process, settings)
    print_table(rows, in_process, targets)

    result = {
        **provenance("serving", "bench/serving.py", argv),
        "model": {
            "name": MODEL,
            "input_size": input_size,
            "output_size": output_size,
            "memory_shape": list(model.memory_shape),
            "state_bytes": model.state_bytes,
        },
        "settings": {
            **asdict(settings),
            "kernel_backend_setting": KERNEL_BACKEND,  # MEMSERVE_KERNEL_BACKEND; rows: what served
            "pool_slots": POOL_SLOTS,
            "server_command": server_command(True)[1:],
            "echo_command": echo_command()[1:],
            "client": "this process: grpc.aio, one task per session, channels round robin",
        },
        "in_process": [asdict(row) for row in in_process],
        "levels": [{**asdict(row), "ok": row.ok} for row in rows],
        "targets": targets,
        "rounds": per_round,
    }
    write_record(result, args.out or ROOT / "bench" / "results" / "serving-cpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

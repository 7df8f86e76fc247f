"""Benchmark of the v2 inference API (KServe v2, `serving/kserve.py`) beside memserve.v1, on
one real server, in the same run: session-steps/s of each call shape at each concurrency C,
and the ratio v2 / v1 (the issue's target: at least 0.85 for the same call shape).

Call shapes, T=1 each, `ntm-copy` on the PyTorch reference kernels:
- unary: memserve.v1 `Step` vs v2 `ModelInfer` (INPUT FP32 [1, 9]);
- stream: one `StepStream` per session vs one `ModelStreamInfer` per sequence, one request
  in flight on each (the call shape a Triton client has with one stream per sequence).

A v1 session is made by CreateSession and stepped; a v2 sequence starts with its first
request (`sequence_start`, in the warm-up) and is ended after the window (one more request).
Each round measures every (shape, C) for v1 and v2 back to back, in alternating order, on the
same server, with the load generator's closed loop, recorder and CPU accounting
(`bench/serving.py`, `clients/loadgen/`); ratios are per round, decided on the median.
Writes bench/results/kserve-cpu.json; docs/performance.md ("KServe v2") has the figures.

    python bench/kserve.py                          # C = 1, 16, 64; 3 rounds (about 6 min)
    python bench/kserve.py --rounds 1 --levels 1 4 --seconds 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/

from bench.child_server import KERNEL_BACKEND, ChildServer  # noqa: E402
from bench.serving import (  # noqa: E402
    CONNECT_SECONDS,
    MODEL,
    LevelRow,
    Shape,
    StepCalls,
    batching_over,
    provenance,
    run_level,
    server_command,
    write_record,
)
from clients.channel import Metadata  # noqa: E402
from clients.loadgen.kserve import KServeStep  # noqa: E402
from clients.loadgen.recording import INVALID_RESPONSE, Outcome  # noqa: E402
from clients.loadgen.schedule import Session, now  # noqa: E402
from clients.loadgen.settings import Settings as LoadgenSettings  # noqa: E402
from clients.loadgen.workload import Workload  # noqa: E402

TARGET_RATIO = 0.85  # v2 session-steps/s over v1's, same call shape and C
SHAPES = {"unary": (Shape("unary_t1", "Step", 1), "ModelInfer"),
          "stream": (Shape("stream_t1", "StepStream", 1), "ModelStreamInfer")}  # fmt: skip


@dataclass
class Timing:
    """What a level needs (`bench.serving.LevelTiming`)."""

    channels: int
    warmup: float
    seconds: float


class CachedStep(KServeStep):
    """The load generator's v2 step workload, with each sequence's request after its START
    built once, as `bench.serving.StepCalls` builds each session's Step request once."""

    def __init__(self, settings: LoadgenSettings, info: Any) -> None:
        super().__init__(settings, info)
        self.cached: dict[str, Any] = {}

    def infer_request(self, session: Session, used: int | None = None) -> Any:
        if (session.used if used is None else used) == 0:
            return super().infer_request(session, used)
        request = self.cached.get(session.session_id)
        if request is None:
            request = self.cached[session.session_id] = super().infer_request(session, used)
        return request

    async def end(self, session: Session, timeout: float | None, metadata: Metadata) -> None:
        self.cached.pop(session.session_id, None)
        await super().end(session, timeout, metadata)


class KServeStream(CachedStep):
    """One ModelStreamInfer per sequence, one request in flight on it."""

    method = "ModelStreamInfer"

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        if session.stream is None:
            session.stream = session.stub.ModelStreamInfer(timeout=timeout, metadata=metadata)
        await session.stream.write(self.infer_request(session))
        message = await session.stream.read()
        done = now()
        if message is grpc.aio.EOF or message.error_message:
            detail = "EOF" if message is grpc.aio.EOF else message.error_message
            return Outcome(INVALID_RESPONSE, done, detail)
        if len(message.infer_response.raw_output_contents[0]) != self.output_bytes:
            return Outcome(INVALID_RESPONSE, done, "OUTPUT of the wrong size")
        return Outcome("OK", done, steps=self.settings.steps_per_call)

    async def release(self, session: Session) -> None:
        stream, session.stream = session.stream, None
        if stream is not None:
            await stream.done_writing()
            await stream.code()


def v2_workload(kind: str, info: Any) -> CachedStep:
    settings = LoadgenSettings(
        workload="step", model=MODEL, target="", concurrency=(), rates=(), warmup=0,
        duration=None, requests=None, max_outstanding=1, drain_timeout=1, timeout=60,
        connect_timeout=CONNECT_SECONDS, channels=1, seed=0, session_ttl=None,
        metrics_url=None, progress=False, protocol="kserve", steps=sys.maxsize,
        steps_per_call=1,
    )  # fmt: skip
    return (KServeStream if kind == "stream" else CachedStep)(settings, info)


async def measure(
    child: ChildServer, api: str, kind: str, concurrency: int, timing: Timing, info: Any,
    round_: int,
) -> LevelRow:  # fmt: skip
    """C sessions (v1) or sequences (v2) calling back to back for the warm-up and the
    window; what completed in the window, with CPU and the server's batching."""
    shape, v2_method = SHAPES[kind]
    workload: Workload
    if api == "v1":
        workload = StepCalls(shape, int(info.input_size), int(info.output_size))
    else:
        workload = v2_workload(kind, info)
    protocol = "kserve" if api == "v2" else "memserve"
    recorder, usage = await run_level(child, workload, concurrency, timing, True, protocol)
    seconds = recorder.window()
    calls = recorder.answered
    return LevelRow(
        target=api, shape=shape.name, method=shape.method if api == "v1" else v2_method,
        steps_per_call=1, concurrency=concurrency, channels=timing.channels, seconds=seconds,
        calls=calls, session_steps=calls, calls_per_s=calls / seconds,
        session_steps_per_s=calls / seconds,
        latency_us=recorder.answer_latency.microseconds(),
        latency_mean_us=recorder.answer_latency.mean_microseconds,
        errors=dict(sorted(recorder.window_errors.items())),
        client_cpu_seconds=usage.client_cpu * seconds / usage.measured,
        server_cpu_seconds=usage.server_cpu * seconds / usage.measured,
        other_cpu_seconds=usage.other_cpu * seconds / usage.measured,
        stolen_cpu_seconds=usage.stolen_cpu * seconds / usage.measured,
        batching=batching_over(usage.metrics_before, usage.metrics_after, usage.measured),
        backends=child.backends(),
        round=round_,
    )  # fmt: skip


async def run(levels: list[int], rounds: int, timing: Timing) -> list[LevelRow]:
    rows: list[LevelRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-kserve-") as logs:
        server = ChildServer(server_command(True), Path(logs))
        await asyncio.to_thread(server.start)
        try:
            from protos import memserve_pb2, memserve_pb2_grpc

            with grpc.insecure_channel(server.target, [("grpc.enable_http_proxy", 0)]) as channel:
                stub = memserve_pb2_grpc.MemServeStub(channel)  # type: ignore[no-untyped-call]
                models = stub.ListModels(memserve_pb2.ListModelsRequest()).models
            info = next(m for m in models if m.name == MODEL)
            for round_ in range(1, rounds + 1):
                order = ("v1", "v2") if round_ % 2 else ("v2", "v1")
                for kind in SHAPES:
                    for concurrency in levels:
                        for api in order:
                            row = await measure(server, api, kind, concurrency, timing, info,
                                                round_)  # fmt: skip
                            rows.append(row)
                            print(f"round {round_} {api} {kind:6} C={concurrency:<4} "
                                  f"{row.session_steps_per_s:9.1f} session-steps/s "
                                  f"p50 {row.latency_us.get('p50', 0) / 1e3:6.2f} ms "
                                  f"errors {row.errors or '-'}", flush=True)  # fmt: skip
        finally:
            server.stop()
    return rows


def ratios(rows: list[LevelRow], levels: list[int], rounds: int) -> dict[str, Any]:
    """v2 / v1 per (shape, C): every round's ratio, the median, and pass/fail."""
    result: dict[str, Any] = {}
    for kind, (shape, _) in SHAPES.items():
        for concurrency in levels:
            per_round = []
            ok = True
            for round_ in range(1, rounds + 1):
                pair = {r.target: r for r in rows if (r.shape, r.concurrency, r.round)
                        == (shape.name, concurrency, round_)}  # fmt: skip
                v1, v2 = pair["v1"], pair["v2"]
                ok = ok and v1.ok and v2.ok
                per_round.append(v2.session_steps_per_s / v1.session_steps_per_s
                                 if v1.session_steps_per_s else float("nan"))  # fmt: skip
            median = statistics.median(per_round)
            cpu = {api: statistics.median(
                r.server_cpu_seconds / r.calls * 1e6 for r in rows
                if (r.target, r.shape, r.concurrency) == (api, shape.name, concurrency) and r.calls
            ) for api in ("v1", "v2")}  # fmt: skip
            result[f"{kind} C={concurrency}"] = {
                "shape": shape.name, "concurrency": concurrency, "rounds": per_round,
                "median": median, "threshold": TARGET_RATIO,
                "pass": ok and median >= TARGET_RATIO,
                # Less at the mercy of other load on the machine than throughput: the server's
                # CPU (its process and the model's) per answered call, median over rounds.
                "server_cpu_us_per_call": cpu, "v1_over_v2_cpu": cpu["v1"] / cpu["v2"],
            }  # fmt: skip
    return result


def median_rate(rows: list[LevelRow], api: str, shape: str, concurrency: int) -> float:
    return statistics.median(
        r.session_steps_per_s for r in rows
        if (r.target, r.shape, r.concurrency) == (api, shape, concurrency)
    )  # fmt: skip


# ---------------------------------------------------------------------------- handlers


class StubEngine:
    """What the handlers ask of an engine, answering a step at once: the handlers' own cost."""

    name = MODEL

    def __init__(self, input_size: int, output_size: int) -> None:
        self.card = SimpleNamespace(model_type="ntm", input_size=input_size,
                                    output_size=output_size, text_operations=False,
                                    tokenizer_json=None)  # fmt: skip
        self.settings = SimpleNamespace(max_steps_per_call=64, session_ttl=600.0)
        self.outputs = np.zeros((1, output_size), np.float32)

    async def step(self, *args: Any) -> tuple[np.ndarray, int]:
        return self.outputs, 1


async def handler_costs(requests: int = 20000) -> dict[str, float]:
    """CPU microseconds per request of each API's handler in this process (decode, check,
    route, encode, serialize; the engine stubbed): the protocol's own cost, which other load
    on the machine hardly disturbs."""
    from protos import memserve_pb2, tensors
    from serving.kserve import KServeService
    from serving.metrics import Metrics
    from serving.service import MemServeService
    from serving.sessions import Session as ServerSession
    from serving.sessions import SessionTable

    table, metrics = SessionTable(), Metrics()
    engines: dict[str, Any] = {MODEL: StubEngine(9, 8)}
    session = ServerSession(id="0" * 32, model=MODEL, ttl=600.0, last_used=0.0)
    table.add(session)
    v1 = MemServeService(engines, table, metrics)
    v2 = KServeService(engines, table, metrics, v1.admission)
    inputs = np.random.default_rng(0).random((1, 9), dtype=np.float32)
    step = memserve_pb2.StepRequest(session_id=session.id, inputs=tensors.encode(inputs))
    infer = v2_workload("unary", memserve_pb2.ModelInfo(input_size=9, output_size=8))
    model_infer = infer.infer_request(Session(session.id, 0), used=1)

    async def repeated(request: Any) -> AsyncIterator[Any]:
        for _ in range(requests):
            yield request

    async def unary(handler: Any, request: Any) -> None:
        for _ in range(requests):
            (await handler(request, None)).SerializeToString()

    async def stream(handler: Any, request: Any) -> None:
        async for message in handler(repeated(request), None):
            message.SerializeToString()

    runs: dict[str, Callable[[], Awaitable[None]]] = {
        "v1 Step": lambda: unary(v1.Step, step),
        "v2 ModelInfer": lambda: unary(v2.ModelInfer, model_infer),
        "v1 StepStream": lambda: stream(v1.StepStream, step),
        "v2 ModelStreamInfer": lambda: stream(v2.ModelStreamInfer, model_infer),
    }
    costs: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):  # interleaved; the median of three
        for name, run in runs.items():
            start = time.process_time()
            await run()
            costs[name].append((time.process_time() - start) / requests * 1e6)
    return {name: statistics.median(values) for name, values in costs.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kserve-cpu.json")
    args = parser.parse_args(argv)
    timing = Timing(args.channels, args.warmup, args.seconds)
    started = time.monotonic()
    handlers = asyncio.run(handler_costs())
    for name, cost in handlers.items():
        print(f"handler {name:20} {cost:6.1f} CPU us/request (engine stubbed)")
    rows = asyncio.run(run(args.levels, args.rounds, timing))
    verdicts = ratios(rows, args.levels, args.rounds)
    print(f"\n{'shape':8} {'C':>4} {'v1 steps/s':>11} {'v2 steps/s':>11} {'v2/v1':>6}  target"
          "          server CPU us/call v1 v2")  # fmt: skip
    for name, verdict in verdicts.items():
        kind = name.split()[0]
        c, shape = verdict["concurrency"], verdict["shape"]
        print(f"{kind:8} {c:>4} {median_rate(rows, 'v1', shape, c):>11.1f} "
              f"{median_rate(rows, 'v2', shape, c):>11.1f} {verdict['median']:>6.3f}  "
              f">= {TARGET_RATIO}: {'pass' if verdict['pass'] else 'FAIL'}  "
              f"{verdict['server_cpu_us_per_call']['v1']:7.0f} "
              f"{verdict['server_cpu_us_per_call']['v2']:7.0f}")  # fmt: skip
    record = {
        **provenance("kserve", "bench/kserve.py", argv),
        "model": MODEL,
        "settings": {
            **vars(args),
            "out": str(args.out),
            "kernel_backend_setting": KERNEL_BACKEND,  # MEMSERVE_KERNEL_BACKEND; rows: what served
            "server_command": server_command(True)[1:],
            "seconds_taken": round(time.monotonic() - started, 1),
        },
        "handler_cpu_us_per_request": handlers,
        "levels": [{**asdict(row), "ok": row.ok} for row in rows],
        "ratios": verdicts,
    }
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

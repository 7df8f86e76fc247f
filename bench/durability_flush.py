"""Part 5 of bench/durability.py: what a disk flush costs everything else on the machine.

`memory`'s server, which writes nothing, under the T=1 load of part 1 while a process of its
own appends a launch's records (`FLUSH_BYTES`) to a file on the store's disk and fdatasyncs
them, `rate` times a second; its session-steps/s over its own with no flushing in the same
round. A `dir:` store with `--durability launch` flushes once per launch, a few hundred times
a second at T=1, and a `redis://` store's redis-server once per commit script: this part
tells how much of their gap to `memory` the flushes alone make on this machine, whoever
issues them (docs/performance.md, "What limits T = 1").
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from bench.durability_commits import summary_us
from bench.durability_servers import CONFIGS, DurableServer, Settings, scratch_directory
from bench.durability_throughput import SHAPES, ExpiringCalls, settle
from bench.serving import LevelRow, measure_level, median_of, quotient

FLUSH_RATES = (0, 100, 400)  # fdatasyncs a second: none, and about a dir: store's at T=1
FLUSH_BYTES = 700  # a launch of a few T=1 calls' records
START_SECONDS = 30.0


def flush_at(path: str, rate: float, started: Event, stop: Event, results: Any) -> None:
    """Append FLUSH_BYTES to `path` and fdatasync it `rate` times a second until `stop`;
    put every fdatasync's duration in seconds on `results`. Runs in a process of its own."""
    durations: list[float] = []
    descriptor = -1
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        payload = os.urandom(FLUSH_BYTES)
        started.set()
        due = time.perf_counter()
        while not stop.is_set():
            os.write(descriptor, payload)
            begun = time.perf_counter()
            os.fdatasync(descriptor)
            durations.append(time.perf_counter() - begun)
            due = max(due + 1.0 / rate, time.perf_counter() - 1.0)  # no burst after a stall
            stop.wait(max(0.0, due - time.perf_counter()))
    finally:
        if descriptor >= 0:
            os.close(descriptor)
        results.put(durations)


@contextlib.contextmanager
def flushing(directory: Path, rate: int) -> Iterator[dict[str, Any]]:
    """A flushing process at `rate` (none at 0) for the `with` block; the dict it yields is
    filled, once the block ends, with how many fdatasyncs it made, a second, and their
    durations."""
    measured: dict[str, Any] = {"rate": rate}
    if rate == 0:
        yield measured
        return
    context = multiprocessing.get_context("spawn")
    started, stop, results = context.Event(), context.Event(), context.Queue()
    path = str(directory / f"flush-{rate}.bin")
    process = context.Process(target=flush_at, args=(path, rate, started, stop, results))
    process.start()
    began = time.perf_counter()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not started.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the flushing process did not start (exit code "
                                   f"{process.exitcode}; writing to {path})")  # fmt: skip
        began = time.perf_counter()  # its rate counts from its first flush, not its start
        yield measured
    finally:
        stop.set()
        seconds = time.perf_counter() - began
        durations: list[float] = []
        with contextlib.suppress(queue.Empty):  # it puts them last, whether or not it failed
            durations = results.get(timeout=START_SECONDS)
        process.join(START_SECONDS)
        with contextlib.suppress(OSError):
            os.remove(path)
    measured.update(
        fdatasyncs=len(durations),
        achieved_per_s=len(durations) / seconds,
        fdatasync=summary_us(durations) if durations else {},
    )


async def measure_flush_cost(
    settings: Settings, work: Path, input_size: int, output_size: int
) -> dict[str, Any]:
    """Every round: `memory`'s server at T=1 beside each flushing rate, the rates in one
    order in odd rounds and the reverse in even ones; each level's session-steps/s over the
    same round's level without flushing."""
    shape, concurrency = SHAPES[0], settings.concurrency[0]

    class Calls(ExpiringCalls):
        ttl = settings.level_ttl

    levels: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        directory = scratch_directory(stack, settings, "flush")
        server = DurableServer(CONFIGS[0], work, "memory", None, settings.server_env)
        server.start()
        stack.callback(server.stop)
        for round_ in range(1, settings.rounds + 1):
            for rate in FLUSH_RATES if round_ % 2 else FLUSH_RATES[::-1]:
                await settle([server])
                with flushing(directory, rate) as flusher:
                    row: LevelRow = await measure_level(
                        server, f"memory, {rate} fdatasyncs/s", shape, concurrency, settings,
                        input_size, output_size, round_, Calls,
                    )  # fmt: skip
                levels.append({"round": round_, "row": row, "flusher": flusher})
                print(
                    f"round {round_} flush {rate:>4}/s  {row.session_steps_per_s:9.1f} "
                    f"steps/s  p50 {row.latency_us['p50'] / 1e3:7.2f} ms",
                    flush=True,
                )
    return flush_record(levels, settings.rounds)


def flush_record(levels: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    def rate_of(round_: int, rate: int) -> float:
        [level] = [
            level
            for level in levels
            if level["round"] == round_ and level["flusher"]["rate"] == rate
        ]
        return float(level["row"].session_steps_per_s)

    ratios = [
        {str(rate): quotient(rate_of(round_, rate), rate_of(round_, 0)) for rate in FLUSH_RATES}
        for round_ in range(1, rounds + 1)
    ]
    return {
        "shape": SHAPES[0].name,
        "flush_bytes": FLUSH_BYTES,
        "rates": list(FLUSH_RATES),
        "levels": [
            {"round": level["round"], "flusher": level["flusher"], **asdict(level["row"])}
            for level in levels
        ],
        "ratios": ratios,
        "median_ratio": {
            str(rate): median_of([by_rate[str(rate)] for by_rate in ratios]) for rate in FLUSH_RATES
        },
    }


def run(settings: Settings, work: Path, input_size: int, output_size: int) -> dict[str, Any]:
    return asyncio.run(measure_flush_cost(settings, work, input_size, output_size))

"""One `memserve loadgen` run: read the server's metrics, connect, check the model, run every
level of the sweep (a table row as each ends), then the notes and the files.

Ctrl-C ends the level under way: no new request starts, those in flight get a second to
finish (then they are cancelled), its sessions are deleted, and the run reports what it
measured, with exit code 130. A second Ctrl-C quits at once, exit code 130, without the
report; the sessions still open are left to expire on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from clients.loadgen import report, server_metrics
from clients.loadgen.progress import Progress
from clients.loadgen.recording import CallCounts, Recorder
from clients.loadgen.schedule import Level, Plan, closed_loop, now, open_loop
from clients.loadgen.settings import Settings
from clients.loadgen.workloads import (
    Connection,
    GrpcTarget,
    LoadgenError,
    Workload,
    make_workload,
)
from protos import memserve_pb2

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports it


def run(settings: Settings, command: str) -> int:
    """Run the sweep; 0 when it ran to the end, 130 after Ctrl-C, 1 when it cannot start."""
    try:
        return asyncio.run(_run(settings, command))
    except LoadgenError as error:
        print(f"memserve loadgen: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the handler is in place
        print("memserve loadgen: stopped", file=sys.stderr)
        return INTERRUPTED_EXIT


def quit_now() -> None:
    """The second Ctrl-C: flush what was printed and exit, leaving the rest undone."""
    print("\nmemserve loadgen: stopped", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT)


def level_label(settings: Settings, value: float) -> str:
    return f"R={value:g}" if settings.mode == "open" else f"C={int(value)}"


async def watch_server(level: Level, url: str, model: str, workload: str) -> dict[str, Any]:
    """Scrape `url` when the level's window opens and when it closes; the difference."""
    opened = asyncio.ensure_future(level.opened.wait())
    closed = asyncio.ensure_future(level.closed.wait())
    await asyncio.wait({opened, closed}, return_when=asyncio.FIRST_COMPLETED)
    opened.cancel()
    if not level.opened.is_set():
        closed.cancel()
        return {"error": "the level ended before its measuring window"}
    try:
        before = await asyncio.to_thread(server_metrics.scrape, url)
        start = now()
        await closed
        after = await asyncio.to_thread(server_metrics.scrape, url)
    except (OSError, ValueError) as error:
        closed.cancel()
        return {"error": f"cannot read {url}: {error}"}
    return server_metrics.summarize(before, after, model, now() - start, workload)


async def run_level(
    settings: Settings,
    connection: Connection,
    workload: Workload,
    value: float,
    interrupted: asyncio.Event,
    metrics_url: str | None,
    progress: Progress,
) -> dict[str, Any]:
    """One level of the sweep, as its JSON record."""
    recorder = Recorder(workload.method)
    level = Level(level_label(settings, value), recorder, interrupted)
    target = GrpcTarget(connection, workload, recorder, settings.timeout)
    plan = Plan(
        warmup=settings.warmup,
        duration=settings.duration,
        requests=settings.requests,
        requests_per_session=settings.requests_per_session,
        max_outstanding=settings.max_outstanding,
        drain_timeout=settings.drain_timeout,
    )
    watcher = (
        asyncio.create_task(watch_server(level, metrics_url, settings.model, settings.workload))
        if metrics_url
        else None
    )
    progress.start(level, settings.warmup, settings.duration, settings.requests)
    try:
        if settings.mode == "open":
            await open_loop(target, plan, level, value)
        else:
            await closed_loop(target, plan, level, int(value))
    finally:
        await progress.stop()
    server = await watcher if watcher is not None else None
    record: dict[str, Any] = {
        "level": level.label,
        "mode": settings.mode,
        "concurrency": int(value) if settings.mode == "closed" else None,
        "rate": value if settings.mode == "open" else None,
        **recorder.summary(),
    }
    if settings.mode == "open":
        record["open_loop"] = recorder.open_loop_summary()
    record["server"] = server
    return record


def describe(settings: Settings, info: memserve_pb2.ModelInfo) -> list[str]:
    """The lines above the table: what is measured, how."""
    if settings.workload == "step":
        what = (
            f"sessions of {settings.steps} Step calls of T={settings.steps_per_call} inputs "
            f"[{settings.steps_per_call}, {info.input_size}]"
        )
    else:
        what = f"sessions of {settings.turns} Generate turns, max_tokens {settings.max_tokens}"
    if settings.mode == "open":
        shape = (
            f"open loop at {', '.join(f'{r:g}' for r in settings.rates)} requests/s "
            f"(at most {settings.max_outstanding} in flight)"
        )
    else:
        shape = f"closed loop, concurrency {', '.join(map(str, settings.concurrency))}"
    length = (
        f"{settings.duration:g} s" if settings.duration is not None else
        f"{settings.requests} requests"
    )  # fmt: skip
    return [
        f"memserve loadgen {settings.workload}: {info.name} ({info.type}) at {settings.target}"
        + (" over the v2 inference API (kserve)" if settings.protocol == "kserve" else ""),
        f"{shape}; {what}",
        f"each level: {settings.warmup:g} s warm-up, then {length} measured",
    ]


def versions() -> dict[str, str]:
    try:
        memserve_version = metadata.version("memserve")
    except metadata.PackageNotFoundError:
        memserve_version = "unknown"
    return {
        "memserve": memserve_version,
        "python": platform.python_version(),
        "grpcio": str(grpc.__version__),
        "numpy": np.__version__,
    }


async def _run(settings: Settings, command: str) -> int:
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if interrupted.is_set():
            quit_now()
        interrupted.set()
        print(
            "\ninterrupted: ending this level, deleting its sessions (Ctrl-C again to quit)",
            file=sys.stderr,
            flush=True,
        )

    handling = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)  # main thread only
        handling = True
    connection = Connection.of(settings)
    try:
        return await _sweep(settings, command, connection, interrupted)
    finally:
        await connection.close()
        if handling:
            loop.remove_signal_handler(signal.SIGINT)


async def _sweep(
    settings: Settings, command: str, connection: Connection, interrupted: asyncio.Event
) -> int:
    metrics_url = settings.metrics_url
    metrics_error: str | None = None
    run_before: server_metrics.Samples | None = None
    if metrics_url is not None:
        run_before, metrics_error = await asyncio.to_thread(server_metrics.first_scrape,
                                                            metrics_url)  # fmt: skip
        if metrics_error is not None:
            print(f"server metrics: {metrics_error}; carrying on without them", file=sys.stderr)
    sent = CallCounts()
    await connection.connect(settings.connect_timeout)
    info = await connection.model_info(settings, sent)
    workload = make_workload(settings, info)
    for line in describe(settings, info):
        print(line)
    print(
        f"server metrics: {metrics_url}" if metrics_error is None and metrics_url
        else f"server metrics: {metrics_error or 'off (--no-metrics)'}"
    )  # fmt: skip
    table = report.Table(settings.workload, settings.mode, sys.stdout)
    table.header()
    progress = Progress(settings.progress)
    rows: list[dict[str, Any]] = []
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for value in settings.levels:
        if interrupted.is_set():
            break
        url = metrics_url if metrics_error is None else None
        row = await run_level(settings, connection, workload, value, interrupted, url, progress)
        rows.append(row)
        table.row(row)
        for method, by_code in row["calls"].items():
            for code, count in by_code.items():
                sent.add(method, code, count=count)

    counted = None
    if run_before is not None and metrics_url is not None:
        with contextlib.suppress(OSError, ValueError):
            run_after = await asyncio.to_thread(server_metrics.scrape, metrics_url)
            counted = server_metrics.request_delta(run_before, run_after)
    document: dict[str, Any] = {
        "tool": "memserve loadgen",
        "command": command,
        "date": date,
        "versions": versions(),
        "host": platform.node(),
        "target": settings.target,
        "workload": settings.workload,
        "mode": settings.mode,
        "model": {
            "name": info.name,
            "type": info.type,
            "input_size": info.input_size,
            "output_size": info.output_size,
            "memory_shape": list(info.memory_shape),
            "state_bytes": info.state_bytes,
        },
        "settings": settings.record(),
        "interrupted": interrupted.is_set(),
        "levels": rows,
        "requests_sent": sent.record(),
        "server_metrics": {"url": metrics_url, "error": metrics_error},
        "server_requests_during_run": counted,
    }
    print()
    for line in report.notes(rows, document):
        print(line)
    if settings.json_path is not None:
        report.write_json(settings.json_path, document)
        print(f"wrote {settings.json_path}")
    if settings.csv_path is not None:
        report.write_csv(settings.csv_path, rows)
        print(f"wrote {settings.csv_path}")
    if settings.plot_path is not None:
        title = f"memserve loadgen {settings.workload}: {info.name}, {settings.mode} loop"
        report.write_plot(settings.plot_path, rows, title, settings.workload)
        print(f"wrote {settings.plot_path}")
    return INTERRUPTED_EXIT if interrupted.is_set() else 0

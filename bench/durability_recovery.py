"""Part 4 of bench/durability.py: recovery after kill -9. `--sessions` sessions with
`--calls-per-session` Step calls (T=1) each, on `dir:` and on `redis://` (`--durability
launch`); kill -9 of the server; a new server on the same store: (a) its process's start to
its "serving" log line (every session known: the store's index read), (b) the first call on
every session, `--recovery-concurrency` at a time (each brings its session's state back: the
calls replayed in the model process), then a second call on each (the state in place).
`recovery_verdict` says what the target is judged on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.durability_servers import (
    DurableServer,
    Settings,
    StoreConfig,
    scratch_directory,
    store_url,
)
from bench.redis_server import RedisServer
from bench.serving import MODEL
from clients.loadgen.recording import Latencies

RECOVERY_SECONDS = 10.0  # the target
SESSION_TTL = 3600.0  # recovery sessions outlive a slow fill
STALL_SECONDS = 60.0  # no answer for this long and the server is taken as hung


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
    result: dict[str, Any] = {
        "slots": settings.recovery_slots,
        "store": kind,
        "durability": "launch",
        "sessions": settings.sessions,
        "calls_per_session": settings.calls_per_session,
        "concurrency": settings.recovery_concurrency,
    }
    with contextlib.ExitStack() as stack:
        directory = scratch_directory(stack, settings, kind) / "store"
        redis_server = None
        if kind == "redis":
            redis_server = stack.enter_context(RedisServer(work / "redis-recovery"))
        url = store_url(kind, directory, redis_server)

        def server() -> DurableServer:
            slots = ("--slots", str(settings.recovery_slots))
            return DurableServer(config, work, url, redis_server, settings.server_env, slots)

        def calls(target: str, expected: int, create: bool = False) -> dict[str, Any]:
            return asyncio.run(
                call_each(
                    target, ids, settings.recovery_concurrency, expected, input_size,
                    create=create, calls=settings.calls_per_session if create else 1,
                )
            )  # fmt: skip

        first = server()
        result["start_empty"] = start_timed(first)
        ids = [""] * settings.sessions
        try:
            result["fill"] = fill = calls(first.target, 0, create=True)
            print(
                f"recovery {kind}: {settings.sessions} sessions x {settings.calls_per_session} "
                f"calls in {fill['seconds']:.1f} s, errors {fill['errors']}"
            )
        finally:
            result["model_process_exited"] = first.kill()
            first.stop()  # closes its clients
        result["store_bytes"] = store_size(kind, directory, redis_server)
        result["open_in_process"] = open_store_seconds(url)

        second = server()
        try:
            result["restart"] = start_timed(second)
            adopted = second.event("store_opened") or {}
            result["adopted"] = adopted.get("sessions", 0)
            result["first_calls"] = calls(second.target, settings.calls_per_session)
            if not result["first_calls"]["stalled"]:
                result["second_calls"] = calls(second.target, settings.calls_per_session + 1)
        finally:
            second.kill()  # not stopped: a hung one would not, and a drain writes every state
            second.stop()
    print_recovery(result)
    return result


def print_recovery(result: dict[str, Any]) -> None:
    restart, first_calls = result["restart"], result["first_calls"]
    again = result.get("second_calls")
    print(
        f"recovery {result['store']}: serving {restart['to_serving_s']:.2f} s after start "
        f"({result['start_empty']['to_serving_s']:.2f} s on an empty store), "
        f"{result['adopted']} sessions known; first call on each: "
        f"{first_calls['seconds']:.2f} s, errors {first_calls['errors']}, wrong step "
        f"{first_calls['wrong_step']}"
        + (f"; STALLED after {first_calls['calls']} calls" if first_calls["stalled"] else "")
        + (f"; a second call on each: {again['seconds']:.2f} s" if again else "")
    )


def recovery_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The target is judged on (a), start to "serving", and passes only if the server came
    back whole: every session known, and the first call on each answered, at the step it
    was left at, without errors (a fast restart that lost sessions or state is no recovery).
    From "serving" on every session answers, its state brought back on its first call
    (docs/serving.md). (b), the time of the first call on each, is recorded beside it
    against the same line: it is the time to serve N calls that each replay a session,
    bounded by the server's throughput. What of (a) is the store's: `store_open_s`, the
    store opened and listed in this process (a server does so before it loads its model,
    and logs no time for it), and `adopt_s`, the server's own time from its model loaded to
    "serving" (sessions adopted, ports bound). `over_empty_start_s`, (a) less a start of
    the same server on an empty store, holds the store's share too, but is the difference
    of two process starts: on a loaded machine, mostly their noise."""
    stores = {}
    for result in results:
        restart, opened = result["restart"], result["open_in_process"]
        ready = restart["to_serving_s"]
        complete = result["adopted"] == result["sessions"]
        first = result["first_calls"]
        correct = not (first["errors"] or first["wrong_step"] or first["stalled"])
        correct = correct and first["calls"] == result["sessions"]
        stores[result["store"]] = {
            "to_serving_s": ready,
            "store_open_s": opened["open_s"] + opened["list_s"],
            "adopt_s": ready - restart["to_model_loaded_s"],
            "over_empty_start_s": ready - result["start_empty"]["to_serving_s"],
            "all_sessions_known": complete,
            "first_calls_correct": correct,
            "pass": ready < RECOVERY_SECONDS and complete and correct,
            "first_calls_s": first["seconds"],
            "first_calls_under_threshold": first["seconds"] < RECOVERY_SECONDS and correct,
        }
    return {
        "threshold_s": RECOVERY_SECONDS,
        "judged_on": "to_serving_s",
        "stores": stores,
        "pass": bool(stores) and all(s["pass"] for s in stores.values()),
    }

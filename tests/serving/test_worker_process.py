"""A model's process never outlives what should stop it: a worker still loading (it ignores
SIGTERM and does not read its pipe yet) is stopped at once, and a worker whose server is
killed -9 is killed by the kernel. Real spawned processes; `pidfd` polls are the events
waited on."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.locate import resolve
from serving.protocol import CopySlot, Launch, Operation, Replay, StepBatch, batch_of
from serving.worker_client import LATE_SECONDS, WorkerClient, describe_request
from serving.worker_process import WorkerProcess

SIGTERM_BIT = 1 << 14  # signal 15 in /proc/PID/status masks


def ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("SigIgn")).split()[1], 16)


def exits_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` (any process, not only a child) exits within `seconds`."""
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(descriptor, select.POLLIN)
        return bool(poller.poll(seconds * 1000))
    finally:
        os.close(descriptor)


@pytest.fixture
def slow_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fused CPU step's build, which a worker runs while loading, takes 20 s (a C
    compiler that waits first), with an empty build cache; the file it touches once the
    worker is in it."""
    entered = tmp_path / "building"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {entered}\nexec sleep 20\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("MEMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    return entered


def test_a_worker_still_loading_is_stopped_at_once(slow_build: Path) -> None:
    worker = WorkerProcess.start(resolve("ntm-copy"), "cpu", 4, 1)
    pid = worker.process.pid
    assert pid is not None
    connection_ready = worker.connection.poll  # the card would come once the build ends
    deadline = time.monotonic() + 120
    while not slow_build.exists():  # the compiler's first act: the worker is building
        assert not connection_ready(0.05) and time.monotonic() < deadline
    assert ignored_signals(pid) & SIGTERM_BIT  # in `serve`: SIGTERM would do nothing
    began = time.monotonic()
    worker.kill()
    assert not worker.process.is_alive()
    assert time.monotonic() - began < 5  # not the STOP_SECONDS wait for a SIGTERM ignored


def test_a_worker_dies_with_its_server(slow_build: Path) -> None:
    """A server killed -9 while its model loads: the model's process goes too, rather
    than load on for as long as that takes (holding memory a restarted server wants)."""
    script = (
        "import sys\n"
        "from models.locate import resolve\n"
        "from serving.worker_process import WorkerProcess\n"
        "worker = WorkerProcess.start(resolve('ntm-copy'), 'cpu', 4, 1)\n"
        "print(worker.process.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        pid = int(server.stdout.readline())
        deadline = time.monotonic() + 120
        while not slow_build.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        server.kill()
        server.wait()
        assert exits_within(pid, 10)
    finally:
        server.kill()
        server.wait()


def test_a_server_paused_with_its_model_is_not_taken_for_a_stuck_model() -> None:
    """A paused container stops a server and its model's process together. On waking, the
    watchdog's timer is late by the whole pause, which the model did not spend on the
    request: the clock starts again, and the model, which answers at once, lives."""
    worker = WorkerClient(WorkerProcess.start(resolve("ntm-copy"), "cpu", 4, 1), 2.0)
    try:
        worker.wait_ready()
        pid = worker.pid
        assert pid is not None

        async def body() -> None:
            loop = asyncio.get_running_loop()
            os.kill(pid, signal.SIGSTOP)
            pending = asyncio.ensure_future(worker.read(0))
            await asyncio.sleep(0)  # the request is written, its clock started
            assert len(worker.waiting) == 1
            time.sleep(worker.answer_timeout + LATE_SECONDS + 1.0)  # the loop paused
            # The model wakes in the same turn of the loop as the late timer, before the
            # loop can read an answer: the watchdog sees the request still unanswered.
            loop.call_soon(os.kill, pid, signal.SIGCONT)
            state = await pending
            assert "memory" in state
            assert not worker.killed and worker.alive

        asyncio.run(body())
    finally:
        worker.close()


def test_the_watchdog_names_the_request_it_gave_up_on() -> None:
    """What the log line of a killed model process says it was doing: the size of a launch
    (rows, the most steps of one, states moved), a replay's length, or a slot operation."""
    steps = batch_of(
        Operation.STEP,
        np.array([0, 1, 2]),
        [np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32), np.zeros((1, 2), np.float32)],
    )
    assert isinstance(steps, StepBatch)
    tokens = batch_of(Operation.ENCODE, np.array([3]), [7])
    launch = Launch((steps, tokens), park=(5,), restore=((6, {}), (7, {})))
    assert describe_request(launch) == (
        "a launch of 4 rows, up to 4 steps each; 2 states written in, 1 read out"
    )
    assert describe_request(Launch((tokens,))) == (
        "a launch of 1 row, up to 1 step each; 0 states written in, 0 read out"
    )
    replay = Replay(None, ((Operation.STEP, np.zeros((3, 2), np.float32)), (Operation.ENCODE, 1)))
    assert describe_request(replay) == "bringing a stored session back: 2 operations"
    assert describe_request(CopySlot(0, 1)) == "a slot operation (CopySlot)"

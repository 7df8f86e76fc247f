"""A model's process, started: the worker (`serving.worker`) spawned with its end of a pipe.

Nothing here imports torch. `memserve serve` starts its models' processes first
(`serving.startup`) and imports the rest of the server, torch included, while they import
theirs and load their weights: the two imports overlap instead of following each other,
which is most of a server's start (docs/performance.md, "Starting a server").
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

STOP_SECONDS = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class WorkerProcess:
    """A started worker: its process and the server's end of its pipe."""

    directory: Path
    process: BaseProcess
    connection: Connection

    @classmethod
    def start(
        cls, directory: Path, device: str, slots: int, threads: int, nice: int = 0
    ) -> WorkerProcess:
        """Spawn the worker for the checkpoint in `directory`; `device` is a setting
        ("auto", "cpu", "cuda:0", ...) the worker resolves."""
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        connection, child = context.Pipe()
        process = context.Process(
            target=run,
            args=(child, str(directory), device, slots, threads, nice),
            name=f"memserve-model-{directory.name}",
            daemon=True,
        )
        process.start()
        child.close()
        return cls(directory, process, connection)

    def kill(self) -> None:
        """Stop a worker no client took over (the server failed to start); nothing if it
        has stopped already. SIGKILL: a worker ignores SIGTERM (the server drains it), and
        one still loading does not read its pipe; it holds nothing worth keeping yet."""
        self.connection.close()
        self.process.kill()
        self.process.join(timeout=STOP_SECONDS)


def run(
    connection: Connection, directory: str, device: str, slots: int, threads: int, nice: int
) -> None:
    """The worker process's entry point: the worker, and torch, are imported there only."""
    die_with_server()
    from serving.worker import serve

    serve(connection, directory, device, slots, threads, nice)


def die_with_server() -> None:
    """On Linux, have the kernel SIGKILL this process when the server's thread that started
    it ends, a kill -9 of the server included. Otherwise a model process still loading its
    weights (it reads its pipe only once loaded) outlives its server for as long as the load
    takes, holding memory that a restarted server's models want. The server starts its
    models from its main thread, which lives as long as it does."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(1)

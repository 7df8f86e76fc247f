"""The first thing a server does: find its models and start their processes, before it
imports torch (nothing here does), so that their start overlaps its own
(`serving.worker_process`). `serving.loading` then waits for each and builds its engine."""

from __future__ import annotations

import os
from pathlib import Path

from models.locate import bundled_names, resolve
from serving.config import ServerConfig
from serving.worker_process import WorkerProcess


def model_name(spec: str) -> str:
    """The name a model is served under: the bundled name, or the directory's name."""
    return spec if spec in bundled_names() else Path(spec).resolve().name


def start_workers(config: ServerConfig) -> dict[str, WorkerProcess]:
    """A started process for every configured model (default: all bundled ones), by the
    name it is served under; none is left running if one cannot be started."""
    specs = list(config.models) or bundled_names()
    if not specs:
        raise ValueError("no models to serve: pass --models (none are bundled)")
    # Intra-op threads per model process. OpenMP threads spin between operations, so more
    # threads than free cores stall every step: one core stays with the server's process.
    threads = config.threads or max(1, (len(os.sched_getaffinity(0)) - 1) // len(specs))
    started: dict[str, WorkerProcess] = {}
    try:
        for spec in specs:
            name = model_name(spec)
            if name in started:
                raise ValueError(f"two models would be served as {name!r}; rename a directory")
            started[name] = WorkerProcess.start(
                resolve(spec), config.device, config.slots, threads, config.model_nice
            )
    except BaseException:
        for worker in started.values():
            worker.kill()
        raise
    return started

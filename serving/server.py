"""Start, serve and drain: the models' engines, the gRPC server (MemServe, the v2 inference
API of `serving.kserve`, health, reflection) and the Prometheus endpoint, for `memserve serve`.

Shutdown on SIGTERM or SIGINT: health turns NOT_SERVING at once (load balancers stop
sending), new calls get UNAVAILABLE, calls in flight get up to `grace` seconds to finish,
then everything stops and the process exits 0. If a model's process dies, the server
drains the same way and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from kernels import backend
from memserve import __version__
from models import checkpoint
from protos import memserve_pb2
from protos.inference import grpc_service_pb2
from protos.inference.pool import reflection_pool
from serving import kserve
from serving.config import ServerConfig
from serving.durable import open_store
from serving.durable.base import MemorySessionStore, SessionStore
from serving.durable.committer import Committer, Durability
from serving.engine import EngineSettings, ModelEngine
from serving.metrics import Metrics
from serving.rpc import add_to_server
from serving.service import MemServeService
from serving.sessions import SessionTable
from serving.store import DirectoryStore, ParkingStore
from serving.worker_client import WorkerClient

log = logging.getLogger("memserve.server")

SERVICE_NAME = memserve_pb2.DESCRIPTOR.services_by_name["MemServe"].full_name
HEALTH_NAMES = ("", SERVICE_NAME, kserve.SERVICE_NAME)  # the server's and each API's
# Large enough for an exported DNC session with a big link matrix.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def model_name(spec: str) -> str:
    """The name a model is served under: the bundled name, or the directory's name."""
    return spec if spec in checkpoint.bundled_names() else Path(spec).resolve().name


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but this machine has no CUDA device")
    return device


class Server:
    """One memserve process: call `start()`, then `wait()`; `drain()` stops it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.table = SessionTable()
        self.engines: dict[str, ModelEngine] = {}
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.service = MemServeService(self.engines, self.table, self.metrics)
        self.kserve = kserve.KServeService(
            self.engines, self.table, self.metrics, self.service.admission
        )
        self.metrics_http: Any = None
        self.port = 0
        self.metrics_port = -1
        self.stopped = asyncio.Event()
        self._temporary_park_dir: str | None = None
        self.exit_code = 0
        self._drain_task: asyncio.Future[None] | None = None
        self.session_store: SessionStore = MemorySessionStore()
        self.committer: Committer | None = None
        self._health_updates: set[asyncio.Future[None]] = set()

    def load_models(self) -> None:
        """Load every configured model (default: all bundled ones) into an engine."""
        specs = list(self.config.models) or checkpoint.bundled_names()
        if not specs:
            raise ValueError("no models to serve: pass --models (none are bundled)")
        device = pick_device(self.config.device)
        park_dir = self.config.park_dir
        if not park_dir:
            park_dir = self._temporary_park_dir = tempfile.mkdtemp(prefix="memserve-park-")
        parking = ParkingStore(self.config.park_host_bytes, DirectoryStore(park_dir))
        self.session_store = open_store(self.config.store)
        if self.session_store.durable:
            self.committer = Committer(
                self.session_store,
                self.config.durability_interval if self.config.durability == "interval" else None,
                self.metrics,
            )
        durability = Durability(self.committer, self.config.durability, self.config.snapshot_every)
        settings = EngineSettings(
            slots=self.config.slots,
            max_batch=self.config.max_batch,
            max_queue_delay=self.config.max_queue_delay,
            session_ttl=self.config.session_ttl,
            max_session_ttl=self.config.max_session_ttl,
            max_steps_per_call=self.config.max_steps_per_call,
            max_new_tokens=self.config.max_new_tokens,
        )
        # Intra-op threads per model process. OpenMP threads spin between operations, so
        # more threads than free cores stall every step: one core stays with this process.
        threads = self.config.threads or max(1, ((os.cpu_count() or 1) - 1) // len(specs))
        workers: dict[str, tuple[Path, WorkerClient]] = {}
        try:
            for spec in specs:  # every worker loads its model at once
                name = model_name(spec)
                if name in workers:
                    raise ValueError(f"two models would be served as {name!r}; rename a directory")
                directory = checkpoint.resolve(spec)
                workers[name] = (
                    directory,
                    WorkerClient(
                        directory, str(device), settings.slots, threads, self.config.model_nice
                    ),
                )
            for name, (directory, worker) in workers.items():
                try:
                    card = worker.wait_ready()
                except (RuntimeError, MemoryError) as error:  # e.g. the pool does not fit
                    raise ValueError(f"cannot serve {name} on {device}: {error}") from error
                engine = ModelEngine(
                    name, card, worker, settings, self.table, parking, self.metrics, durability
                )
                engine.on_failure = self.fail
                self.engines[name] = engine
                log.info(
                    "model loaded",
                    extra={
                        "event": "model_loaded",
                        "model": name,
                        "type": card.model_type,
                        "path": str(directory),
                        "device": str(device),
                        "backend": card.backend,
                        "slots": settings.slots,
                        "state_bytes": card.state_bytes,
                        "pid": worker.pid,
                    },
                )
        except BaseException:
            for _, worker in workers.values():
                worker.close()
            raise

    async def start(self) -> None:
        """Load the models, bind the ports and start serving."""
        self.load_models()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(self.service, memserve_pb2, "MemServe", server)
        self.kserve.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        files = (memserve_pb2, grpc_service_pb2, health_pb2, reflection_pb2)
        reflection.enable_server_reflection(
            (SERVICE_NAME, kserve.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
            pool=reflection_pool(module.DESCRIPTOR for module in files),
        )
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from error
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address here)")
        if self.config.metrics_port >= 0:
            self.metrics_http, _ = start_http_server(
                self.config.metrics_port, self.config.host, self.metrics.registry
            )
            self.metrics_port = self.metrics_http.server_port
        self._adopt_stored_sessions()
        if self.committer is not None:
            self.committer.on_health = self._store_health
            self.committer.start()
        for engine in self.engines.values():
            engine.start()
        await server.start()
        self.grpc_server = server
        for service in HEALTH_NAMES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "event": "serving",
                "version": __version__,
                "host": self.config.host,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "models": list(self.engines),
                "kernel_backend": backend.describe(),
            },
        )

    def _adopt_stored_sessions(self) -> None:
        """Every session the store holds, known to its model's engine (states come later)."""
        found = self.session_store.sessions()
        adopted, elsewhere = 0, 0
        for summary in found:
            engine = self.engines.get(summary.model)
            if engine is None:
                elsewhere += 1  # left in the store for a server that serves its model
                continue
            engine.persistence.adopt(summary)
            self.kserve.adopt(summary.request_id, summary.session_id, summary.made)
            adopted += 1
        for problem in self.session_store.problems():
            log.warning(problem, extra={"event": "store_damage"})
        log.info(
            "session store opened",
            extra={
                "event": "store_opened",
                "store": self.config.store,
                "durability": self.config.durability if self.session_store.durable else "none",
                "sessions": adopted,
                "sessions_of_other_models": elsewhere,
                "damaged": sum(1 for s in found if s.error is not None),
            },
        )

    def _store_health(self, healthy: bool, why: str) -> None:
        """The session store failed or came back: refuse calls meanwhile, say so in health."""
        self.service.admission.unavailable = None if healthy else f"the session store: {why}"
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        if not self.service.admission.draining:
            for service in HEALTH_NAMES:
                task = asyncio.ensure_future(self.health.set(service, status))
                self._health_updates.add(task)
                task.add_done_callback(self._health_updates.discard)

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, let calls in flight finish (up to grace), stop."""
        if self.service.admission.draining:
            return
        started = time.monotonic()
        log.info("draining", extra={"event": "draining", "grace_seconds": self.config.grace})
        await self.health.enter_graceful_shutdown()
        self.service.admission.draining = True
        deadline = started + self.config.grace
        while self.service.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        left = self.service.admission.in_flight
        committed = 0
        for engine in self.engines.values():  # what is still queued is answered CANCELLED
            committed += await engine.stop()
        if self.committer is not None:
            await self.committer.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(0.5)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        if self._temporary_park_dir:
            shutil.rmtree(self._temporary_park_dir, ignore_errors=True)
        log.info(
            "stopped",
            extra={
                "event": "stopped",
                "seconds": round(time.monotonic() - started, 3),
                "calls_cut_short": left,
                "sessions_committed": committed,
            },
        )
        self.stopped.set()

    def fail(self, error: Exception) -> None:
        """A model can no longer be served (its process is gone): drain and exit 1, so that
        whatever supervises this server starts a new one."""
        if self.exit_code == 0:
            log.error(str(error), extra={"event": "model_process_exited"})
        self.exit_code = 1
        self._start_drain()

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain; returns the exit code (0, or 1 when
        a model's process died)."""
        await self.start()
        loop = asyncio.get_running_loop()

        def on_signal(number: int) -> None:
            log.info("signal", extra={"event": "signal", "signal": signal.Signals(number).name})
            self._start_drain()

        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, on_signal, number)
        await self.stopped.wait()
        return self.exit_code


def serve(config: ServerConfig) -> int:
    """Run a server with `config` until it is told to stop; returns the exit code."""
    return asyncio.run(Server(config).run())

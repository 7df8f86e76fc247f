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
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from memserve import __version__
from protos import memserve_pb2
from protos.inference import grpc_service_pb2
from protos.inference.pool import reflection_pool
from serving import kserve
from serving.config import ServerConfig
from serving.durable import open_store
from serving.durable.base import MemorySessionStore, SessionStore
from serving.durable.committer import Committer, Durability
from serving.engine import ModelEngine
from serving.loading import load_engines, tls_credentials
from serving.metrics import Metrics, served_registry
from serving.replica import Replica
from serving.rpc import add_to_server
from serving.service import MemServeService
from serving.sessions import SessionTable
from serving.tenants import Keys, Tenant
from serving.worker_process import WorkerProcess

log = logging.getLogger("memserve.server")

SERVICE_NAME = memserve_pb2.DESCRIPTOR.services_by_name["MemServe"].full_name
HEALTH_NAMES = ("", SERVICE_NAME, kserve.SERVICE_NAME)  # the server's and each API's
# Large enough for an exported DNC session with a big link matrix.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_PENDING_REQUESTS = 1 << 30  # effectively none: every call received is answered
MAX_STREAMS_PER_CONNECTION = 4096


class Server:
    """One memserve process: call `start()`, then `wait()`; `drain()` stops it."""

    def __init__(
        self, config: ServerConfig, started: dict[str, WorkerProcess] | None = None
    ) -> None:
        self.config = config
        self._started = started  # the models' processes, if started already (`serving.startup`)
        self.metrics = Metrics()
        self.table = SessionTable()
        self.engines: dict[str, ModelEngine] = {}
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.keys = Keys.load(config.auth_keys) if config.auth_keys else None
        self.service = MemServeService(self.engines, self.table, self.metrics, self.keys)
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
        """Open the session store and load every configured model (default: all bundled
        ones) into an engine."""
        park_dir = self.config.park_dir
        if not park_dir:
            park_dir = self._temporary_park_dir = tempfile.mkdtemp(prefix="memserve-park-")
        self.session_store = open_store(self.config.store, self.config.replica)
        if self.config.replica:  # it reads no sessions at start: ask the store it answers
            self.session_store.probe()
        if self.session_store.durable:
            interval = self.config.durability == "interval"
            self.committer = Committer(
                self.session_store,
                self.config.durability_interval if interval else None,
                self.metrics,
            )
        durability = Durability(
            self.committer, self.config.durability, self.config.snapshot_every,
            self.config.replica,
        )  # fmt: skip
        started, self._started = self._started, None
        for name, engine in load_engines(
            self.config, park_dir, self.table, self.metrics, durability, started
        ).items():
            engine.on_failure = self.fail
            engine.lifecycle.parked_bytes = self.parked_bytes
            self.engines[name] = engine
        if self.config.replica and self.committer is not None:
            self.service.replica = Replica(
                self.config.replica, self.committer, self.engines, self.table
            )

    async def start(self) -> None:
        """Load the models, bind the ports and start serving."""
        self.load_models()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                # gRPC cancels calls received beyond this many not yet taken by the server
                # (1000 by default): a burst of calls on one channel came back CANCELLED,
                # uncounted. memserve takes every call and refuses what is too much itself,
                # answering RESOURCE_EXHAUSTED and counting it.
                ("grpc.server.max_pending_requests", MAX_PENDING_REQUESTS),
                # and holds each connection to this many calls at once: more wait in the
                # client, visibly, rather than in this server's memory
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
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
            credentials = tls_credentials(self.config)
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from error
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address here)")
        if self.config.metrics_port >= 0:
            host, port = self.config.metrics_host, self.config.metrics_port
            try:
                self.metrics_http, _ = start_http_server(
                    port, host, served_registry(self.metrics, self.config.replica)
                )
            except OSError as error:
                raise OSError(f"cannot serve metrics on {host}:{port}: {error}") from error
            self.metrics_port = self.metrics_http.server_port
        if not self.config.replica:  # a replica finds sessions in the store as they are used
            self.adopt_stored_sessions()
        self._watch_tenants()
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
                "replica": self.config.replica,
                "backends": {name: engine.card.backend for name, engine in self.engines.items()},
                "tls": "mutual" if self.config.tls_client_ca else bool(self.config.tls_cert),
                "auth": "open: any caller may use every session"
                if self.keys is None
                else f"API keys of {len(self.keys.tenants)} tenants",
            },
        )

    def parked_bytes(self, tenant: str) -> int:
        """State bytes of a tenant's sessions outside the slots, over every model."""
        return sum(e.slots.outside[tenant] * e.card.state_bytes for e in self.engines.values())

    def reload_keys(self) -> None:
        """SIGHUP: read the keys file again; sessions stay as they are. A file that does not
        read leaves the keys as they were, and says why."""
        if not self.config.auth_keys:
            log.info("SIGHUP ignored: no --auth-keys file", extra={"event": "keys_reload"})
            return
        try:
            keys = Keys.load(self.config.auth_keys)
        except ValueError as error:
            log.error(f"keys not reloaded: {error}", extra={"event": "keys_reload_failed"})
            return
        self.keys = self.service.admission.keys = keys
        self._watch_tenants()
        log.info(
            "keys reloaded",
            extra={"event": "keys_reloaded", "tenants": sorted(keys.tenants)},
        )

    def _watch_tenants(self) -> None:
        """Per-tenant gauges for the tenants of the keys file (and only them)."""
        if self.keys is None:
            return
        for name, tenant in self.keys.tenants.items():
            sessions = partial(self.table.per_tenant.__getitem__, name)
            self.metrics.tenant_sessions.labels(name).set_function(sessions)
            calls = partial(self._tenant_calls, tenant)
            for quota, limit, used in (
                ("max_sessions", tenant.max_sessions, sessions),
                ("max_parked_bytes", tenant.max_parked_bytes, partial(self.parked_bytes, name)),
                ("max_concurrent_calls", tenant.max_concurrent_calls, calls),
            ):
                if limit is not None:
                    gauge = self.metrics.tenant_quota_used.labels(name, quota)
                    gauge.set_function(partial(_fraction, used, limit))

    def _tenant_calls(self, tenant: Tenant) -> int:
        return self.service.admission.usage_of(tenant).calls

    def adopt_stored_sessions(self) -> None:
        """Every session the store holds, known to its model's engine (states come later).
        A lone server's start does this once its models are loaded (a replica of a cluster
        does not: it finds sessions in the shared store as they are called)."""
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
        committed = not_written = 0
        try:
            for name, engine in self.engines.items():  # what is queued is answered CANCELLED
                try:
                    done = await engine.stop()
                except Exception:
                    log.exception("model %s did not stop cleanly", name,
                                  extra={"event": "stop_failed", "model": name})  # fmt: skip
                    self.exit_code = 1
                    continue
                committed, not_written = committed + done.written, not_written + done.failed
            if self.committer is not None and not await self.committer.stop():
                log.error("the session store could not be written at drain",
                          extra={"event": "stop_failed"})  # fmt: skip
                self.exit_code = 1
        except Exception:
            log.exception("the session store did not close cleanly", extra={"event": "stop_failed"})
            self.exit_code = 1
        finally:
            if not_written:  # what they did since their last write is lost (`--durability`)
                self.exit_code = 1
            await self._close()
            log.info(
                "stopped",
                extra={
                    "event": "stopped",
                    "seconds": round(time.monotonic() - started, 3),
                    "calls_cut_short": left,
                    "sessions_committed": committed,
                    "sessions_not_written": not_written,
                    "exit_code": self.exit_code,
                },
            )
            self.stopped.set()

    async def _close(self) -> None:
        """Stop listening and remove what this server made for itself."""
        if self.grpc_server is not None:
            await self.grpc_server.stop(0.5)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        if self._temporary_park_dir:
            shutil.rmtree(self._temporary_park_dir, ignore_errors=True)

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
        try:
            await self.start()
        except BaseException:  # its ports, and a park directory of its own, go with it
            await self._close()
            raise
        loop = asyncio.get_running_loop()

        def on_signal(number: int) -> None:
            log.info("signal", extra={"event": "signal", "signal": signal.Signals(number).name})
            self._start_drain()

        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, on_signal, number)
        loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        await self.stopped.wait()
        return self.exit_code


def serve(config: ServerConfig, started: dict[str, WorkerProcess] | None = None) -> int:
    """Run a server with `config` (its models' processes `started` already, or not) until it
    is told to stop; returns the exit code."""
    return asyncio.run(Server(config, started).run())


def _fraction(used: Callable[[], float], limit: float) -> float:
    return used() / limit

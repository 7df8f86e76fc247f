"""What a server loads before it serves: each model's engine over its worker process (started
by `serving.startup`, most often before the server imported torch), and the credentials of
its port. Every worker loads its model at once (they load in parallel); the server itself
never loads weights (each worker sends its model's card)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from serving.config import ServerConfig
from serving.durable.committer import Durability
from serving.engine import EngineSettings, ModelEngine
from serving.metrics import Metrics
from serving.sessions import SessionTable
from serving.startup import start_workers
from serving.store import DirectoryStore, ParkingStore
from serving.worker_client import WorkerClient, WorkerGone
from serving.worker_process import WorkerProcess

log = logging.getLogger("memserve.server")


def tls_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials from its PEM files (None: plaintext); with a client
    CA, clients must present a certificate it signed."""
    if not config.tls_cert:
        return None

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {what} {path}: {error.strerror}") from error

    pair = (read(config.tls_key, "tls_key"), read(config.tls_cert, "tls_cert"))
    client_ca = read(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_engines(
    config: ServerConfig,
    park_dir: str,
    table: SessionTable,
    metrics: Metrics,
    durability: Durability,
    started: dict[str, WorkerProcess] | None = None,
) -> dict[str, ModelEngine]:
    """An engine for every configured model (default: all bundled ones), its worker ready:
    the processes in `started` (`serving.startup`), or started here; nothing is left
    running if one fails."""
    workers = {
        name: WorkerClient(process, config.model_timeout)
        for name, process in (start_workers(config) if started is None else started).items()
    }
    engines: dict[str, ModelEngine] = {}
    try:
        parking = ParkingStore(
            config.park_host_bytes, DirectoryStore(park_dir, config.park_disk_bytes)
        )
        disk = parking.disk
        assert disk is not None
        metrics.park_bytes.labels("host").set_function(lambda: parking.host.bytes)
        metrics.park_bytes.labels("disk").set_function(lambda: disk.bytes)
        metrics.park_capacity_bytes.labels("host").set(config.park_host_bytes)
        metrics.park_capacity_bytes.labels("disk").set(config.park_disk_bytes)
        settings = EngineSettings(
            slots=config.slots,
            max_batch=config.max_batch,
            steps_per_launch=config.steps_per_launch,
            max_queue_delay=config.max_queue_delay,
            session_ttl=config.session_ttl,
            max_session_ttl=config.max_session_ttl,
            max_steps_per_call=config.max_steps_per_call,
            max_new_tokens=config.max_new_tokens,
            max_queued_calls=config.max_queued_calls,
            max_sessions=config.max_sessions,
        )
        for name, worker in workers.items():  # they load at once: each was started
            try:
                card = worker.wait_ready()
            except (RuntimeError, MemoryError, WorkerGone) as error:  # e.g. the pool does not fit
                raise ValueError(
                    f"cannot serve {name} on device {config.device!r}: {error}"
                ) from error
            engines[name] = ModelEngine(
                name, card, worker, settings, table, parking, metrics, durability
            )
            log.info(
                "model loaded",
                extra={
                    "event": "model_loaded",
                    "model": name,
                    "type": card.model_type,
                    "path": str(worker.directory),
                    "device": card.device,
                    "backend": card.backend,
                    "slots": settings.slots,
                    "state_bytes": card.state_bytes,
                    "pid": worker.pid,
                },
            )
    except BaseException:
        for worker in workers.values():
            worker.close()
        raise
    return engines

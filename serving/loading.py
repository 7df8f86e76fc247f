"""What a server loads before it serves: each model's worker process and its engine, and the
credentials of its port. Every worker loads its model at once (they load in parallel); the
server itself never loads weights (each worker sends its model's card)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import torch

from models import checkpoint
from serving.config import ServerConfig
from serving.durable.committer import Durability
from serving.engine import EngineSettings, ModelEngine
from serving.metrics import Metrics
from serving.sessions import SessionTable
from serving.store import DirectoryStore, ParkingStore
from serving.worker_client import WorkerClient

log = logging.getLogger("memserve.server")


def model_name(spec: str) -> str:
    """The name a model is served under: the bundled name, or the directory's name."""
    return spec if spec in checkpoint.bundled_names() else Path(spec).resolve().name


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


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but this machine has no CUDA device")
    return device


def load_engines(
    config: ServerConfig,
    park_dir: str,
    table: SessionTable,
    metrics: Metrics,
    durability: Durability,
) -> dict[str, ModelEngine]:
    """An engine for every configured model (default: all bundled ones), its worker started
    and ready; nothing is left running if one fails."""
    specs = list(config.models) or checkpoint.bundled_names()
    if not specs:
        raise ValueError("no models to serve: pass --models (none are bundled)")
    device = pick_device(config.device)
    parking = ParkingStore(config.park_host_bytes, DirectoryStore(park_dir, config.park_disk_bytes))
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
    # Intra-op threads per model process. OpenMP threads spin between operations, so more
    # threads than free cores stall every step: one core stays with the server's process.
    threads = config.threads or max(1, ((os.cpu_count() or 1) - 1) // len(specs))
    workers: dict[str, tuple[Path, WorkerClient]] = {}
    engines: dict[str, ModelEngine] = {}
    try:
        for spec in specs:  # every worker loads its model at once
            name = model_name(spec)
            if name in workers:
                raise ValueError(f"two models would be served as {name!r}; rename a directory")
            directory = checkpoint.resolve(spec)
            worker = WorkerClient(
                directory, str(device), settings.slots, threads, config.model_nice
            )
            workers[name] = (directory, worker)
        for name, (directory, worker) in workers.items():
            try:
                card = worker.wait_ready()
            except (RuntimeError, MemoryError) as error:  # e.g. the pool does not fit
                raise ValueError(f"cannot serve {name} on {device}: {error}") from error
            engines[name] = ModelEngine(
                name, card, worker, settings, table, parking, metrics, durability
            )
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
    return engines

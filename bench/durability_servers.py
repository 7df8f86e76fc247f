"""The servers bench/durability.py measures, and what every part of it shares: the settings,
the five (store, `--durability`) configurations, `memserve serve` on each store with the
store's own work read beside the server's, and where the stores and the benchmark ran.

A durable server's CPU counts its store's: the redis-server a `redis://` store runs in, and
for `dir:` the server process itself (its writer thread). `ChildServer` (bench/child_server.py)
starts, stops and kills the servers; `RedisServer` (bench/redis_server.py) the redis-servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.child_server import ROOT, ChildServer, process_stat
from bench.redis_server import RedisServer
from bench.serving import server_command

CONCURRENCY = (64, 256)  # C of the T=1 and the T=20 shape (the issue's)


@dataclass(frozen=True)
class StoreConfig:
    """One server of the throughput part: its store and its `--durability`."""

    name: str
    store: str  # memory, dir, redis
    durability: str  # none (memory), launch, interval


CONFIGS = (
    StoreConfig("memory", "memory", "none"),
    StoreConfig("dir-launch", "dir", "launch"),
    StoreConfig("dir-interval", "dir", "interval"),
    StoreConfig("redis-launch", "redis", "launch"),
    StoreConfig("redis-interval", "redis", "interval"),
)


@dataclass
class Settings:
    seconds: float
    warmup: float
    rounds: int
    channels: int
    sessions: int  # recovery
    calls_per_session: int
    recovery_concurrency: int
    recovery_slots: int  # the recovery server's --slots
    commit_seconds: float  # timing budget per commit-cost measurement
    parts: list[str]
    store_dir: str  # where dir: stores and the fdatasync test go
    concurrency: list[int] = field(default_factory=lambda: list(CONCURRENCY))  # per shape
    level_ttl: float = 5.0  # throughput sessions expire this long after their level
    server_env: dict[str, str] = field(default_factory=dict)


def disk_write_bytes(pid: int) -> int:
    """Bytes a process has caused to be sent to the storage layer (/proc/PID/io)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class StoreReading:
    """A durable server's store at one moment: the store process's CPU seconds, the bytes
    the process that writes the store sent to the disk, and Redis's own count of commit
    scripts run and their time (0 for dir:)."""

    cpu: float
    disk_bytes: int
    scripts: int
    script_usec: int


class DurableServer(ChildServer):
    """`memserve serve` on one store. `measure_level` reads `cpu_seconds` when a level's
    window opens and when it closes; here that also takes a `StoreReading`, so that the
    redis-server's CPU counts as the server's (a durable call costs it too) and the store's
    own work over the window is known."""

    def __init__(
        self,
        config: StoreConfig,
        log_dir: Path,
        url: str,
        redis_server: RedisServer | None,
        env: dict[str, str],
        extra: Sequence[str] = (),
    ) -> None:
        command = [*server_command(True), *extra]
        if config.store != "memory":
            command += ["--store", url, "--durability", config.durability]
        super().__init__(command, log_dir, name=config.name, env=env)
        self.config = config
        self.url = url
        self.redis_server = redis_server
        self.redis = (
            redis.Redis(unix_socket_path=str(redis_server.socket))
            if redis_server is not None
            else None
        )
        self.readings: list[StoreReading] = []

    def store_reading(self) -> StoreReading:
        if self.redis_server is None or self.redis_server.process is None:
            writer = self.pid if self.config.store == "dir" else 0
            return StoreReading(0.0, disk_write_bytes(writer) if writer else 0, 0, 0)
        assert self.redis is not None
        pid = self.redis_server.process.pid
        stats: dict[str, Any] = self.redis.info("commandstats").get("cmdstat_evalsha", {})
        return StoreReading(
            (process_stat(pid) or (0, 0.0))[1],
            disk_write_bytes(pid),
            int(stats.get("calls", 0)),
            int(stats.get("usec", 0)),
        )

    def cpu_seconds(self) -> float:
        reading = self.store_reading()
        self.readings.append(reading)
        return super().cpu_seconds() + reading.cpu

    def window_store(self) -> dict[str, float]:
        """The store's work between the last two readings (a level's window)."""
        before, after = self.readings[-2], self.readings[-1]
        scripts = after.scripts - before.scripts
        return {
            "store_cpu_seconds": after.cpu - before.cpu,
            "disk_write_bytes": after.disk_bytes - before.disk_bytes,
            "redis_commits": scripts,
            "redis_commit_mean_us": (after.script_usec - before.script_usec) / scripts
            if scripts
            else 0.0,
        }

    def stop(self) -> int | None:
        if self.redis is not None:
            self.redis.close()
        return super().stop()


def store_url(kind: str, directory: Path, redis_server: RedisServer | None) -> str:
    if kind == "dir":
        return f"dir:{directory}"
    if kind == "redis":
        assert redis_server is not None
        return redis_server.url
    return "memory"


def scratch_directory(stack: contextlib.ExitStack, settings: Settings, name: str) -> Path:
    """A fresh directory under `--store-dir`, removed when `stack` closes."""
    directory = Path(tempfile.mkdtemp(prefix=f"bench-durability-{name}-", dir=settings.store_dir))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    return directory


@contextlib.contextmanager
def servers_running(settings: Settings, work: Path) -> Iterator[list[DurableServer]]:
    """The five throughput servers, each on its own store, for the whole benchmark."""
    with contextlib.ExitStack() as stack:
        servers: list[DurableServer] = []
        for config in CONFIGS:
            redis_server = None
            if config.store == "redis":
                redis_server = stack.enter_context(RedisServer(work / f"redis-{config.name}"))
            directory = scratch_directory(stack, settings, config.name)
            url = store_url(config.store, directory / "store", redis_server)
            servers.append(DurableServer(config, work, url, redis_server, settings.server_env))
        for server in servers:
            server.start()
            stack.callback(server.stop)  # before its store goes
        yield servers


def filesystem_of(path: Path) -> dict[str, Any]:
    """The mount a path is on, and whether the repository is on the same device."""
    best = ("", "", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            resolved = str(path.resolve())
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) >= len(best[1]):
                best = (device, mount, kind)
    return {
        "path": str(path),
        "device": best[0],
        "mount": best[1],
        "type": best[2],
        "same_device_as_repository": os.stat(path).st_dev == os.stat(ROOT).st_dev,
    }


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: the load average and the busiest processes (ps's
    %CPU: their average over their lifetime)."""
    done = subprocess.run(
        ["ps", "-eo", "pid,pcpu,etime,comm,args", "--sort=-pcpu"], capture_output=True, text=True
    )
    busiest = [line[:200] for line in done.stdout.splitlines()[1:6]]
    return {"loadavg_1_5_15": list(os.getloadavg()), "busiest": busiest}

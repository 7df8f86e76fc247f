"""`memserve cluster`'s foreground process: it starts Redis, the replicas and Envoy, watches
them (a process that exits unasked is started again), keeps DIR/cluster.json current, scales
on request, and on SIGTERM or SIGINT stops everything in order: the replicas first (each
drains: its calls in flight finish and are committed), then Envoy, then Redis.

Scaling (`memserve cluster scale N`, which writes DIR/scale.json and sends SIGHUP): new
replicas start and turn healthy before Envoy learns of them; replicas leaving are first
taken out of Envoy's endpoints (their sessions' next calls go to the replicas the hash now
names, which bring them back from the store), then drained. The sessions that move are
those whose replica the hash changes, about 1/N of them; `last_scale` in cluster.json
counts them (`memserve.cluster.maglev`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memserve.cluster import maglev, prometheus
from memserve.cluster.envoy import Endpoint, bootstrap, write_atomically, write_endpoints
from memserve.cluster.processes import Child, EnvoyChild, RedisChild, ReplicaChild
from memserve.cluster.state import SCALE_FILE, alive, read_state, write_state

PROBE_INTERVAL = 0.25  # seconds between health probes of every process
START_SECONDS = 300.0  # a replica loads its models in this much time, or failed to start
REPLICA_PAUSE = 2.0  # seconds before a replica that exited is started again (see restart)


@dataclass(frozen=True)
class Settings:
    """What `memserve cluster` was asked for. Ports of 0 mean any free port."""

    directory: Path
    replicas: int = 3
    host: str = "127.0.0.1"
    port: int = 50051
    admin_port: int = 9901
    replica_port: int = 50052  # replica rI listens on replica_port + I - 1
    metrics_port: int = 9464  # and serves /metrics on metrics_port + I - 1
    serving: list[str] = field(default_factory=list)  # flags for every `memserve serve`
    envoy_binary: str = "envoy"
    envoy_concurrency: int = 1


def index_of(name: str) -> int:
    return int(name[1:])


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.directory.resolve()
        self.logs = self.directory / "logs"
        self.redis = RedisChild(self.directory / "redis", self.logs)
        self.envoy = EnvoyChild(
            self.directory / "envoy", self.logs, settings.port, settings.admin_port
        )
        self.replicas: dict[str, ReplicaChild] = {}
        self.wanted = settings.replicas
        self.state = "starting"
        self.last_scale: dict[str, Any] | None = None
        self.stopping = asyncio.Event()
        self.requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.restarting: set[str] = set()
        self.tasks: set[asyncio.Future[None]] = set()  # restarts under way
        self.written: str = ""
        self.targets: dict[str, str] = {}

    # ------------------------------------------------------------------ the whole

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._scale_requested)
        code = 0
        try:
            await self.start()
            watching = asyncio.ensure_future(self.watch())
            while not self.stopping.is_set():
                request = asyncio.ensure_future(self.requests.get())
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait((request, stop), return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if request.done():
                    await self.scale(request.result())
                else:
                    request.cancel()
            watching.cancel()
        except (RuntimeError, OSError) as error:
            print(f"memserve cluster: error: {error}", file=sys.stderr)
            code = 1
        await self.shutdown()
        return code

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            previous = read_state(self.directory)
        except OSError:
            previous = {}
        pid = int(previous.get("supervisor", {}).get("pid", 0))
        if previous.get("state") not in (None, "stopped") and pid and alive(pid):
            raise OSError(f"a cluster already runs in {self.directory} (supervisor pid {pid})")
        (self.directory / SCALE_FILE).unlink(missing_ok=True)
        self.write()
        self.progress("starting Redis")
        await self.redis.start()
        await self.until(self.redis, "serving", 30.0)
        names = [f"r{i}" for i in range(1, self.wanted + 1)]
        self.progress(f"starting {len(names)} replicas ({', '.join(names)}): loading models")
        await asyncio.gather(*(self.start_replica(name) for name in names))
        self.progress("starting Envoy")
        self.write_envoy_config()
        await self.envoy.start(self.settings.envoy_binary, self.settings.envoy_concurrency)
        await self.envoy.until_ready(60.0)
        scrape = prometheus.config(
            f"127.0.0.1:{self.envoy.extra['admin_port']}",
            targets_file=self.directory / "prometheus-targets.json",
        )
        write_atomically(self.directory / "prometheus.yml", scrape)
        await self.until_ring(set(names), 60.0)
        self.state = "running"
        self.write()
        ports = ", ".join(f"{n} on :{r.port}" for n, r in self.replicas.items())
        self.progress(
            f"serving on {self.settings.host}:{self.envoy.extra['port']} through Envoy "
            f"(admin 127.0.0.1:{self.envoy.extra['admin_port']}); replicas {ports}; "
            f"Redis at {self.redis.url}; state in {self.directory / 'cluster.json'}"
        )

    async def shutdown(self) -> None:
        self.state = "stopping"
        self.write()
        self.progress("stopping: draining the replicas")
        grace = 60.0
        await asyncio.gather(*(r.stop(timeout=grace) for r in list(self.replicas.values())))
        self.progress("stopping Envoy, then Redis")
        await self.envoy.stop(timeout=10.0)
        await self.redis.stop(timeout=30.0)
        self.state = "stopped"
        self.write()
        self.progress("stopped")

    # ------------------------------------------------------------------ replicas

    def port_of(self, first: int, name: str) -> int:
        return 0 if first == 0 else first + index_of(name) - 1

    async def start_replica(self, name: str) -> ReplicaChild:
        replica = self.replicas.get(name)
        if replica is None:
            replica = ReplicaChild(
                name, self.logs,
                self.port_of(self.settings.replica_port, name),
                self.port_of(self.settings.metrics_port, name),
            )  # fmt: skip
            self.replicas[name] = replica
        park = self.directory / "replicas" / name / "park"
        park.mkdir(parents=True, exist_ok=True)
        await replica.start(self.redis.url, park, self.settings.serving)
        self.write()
        await replica.until_serving(START_SECONDS)
        await self.until(replica, "serving", 60.0)
        return replica

    def endpoints(self, names: list[str]) -> list[Endpoint]:
        return [Endpoint(n, "127.0.0.1", self.replicas[n].port) for n in names]

    def ring_names(self) -> list[str]:
        """The replicas Envoy is told of, in the endpoints' order."""
        return sorted((n for n, r in self.replicas.items() if r.wanted), key=index_of)

    def write_envoy_config(self) -> None:
        self.envoy.directory.mkdir(parents=True, exist_ok=True)
        endpoints = self.envoy.directory / "endpoints.json"
        write_endpoints(endpoints, self.endpoints(self.ring_names()))
        config = bootstrap(
            self.settings.host, int(self.envoy.extra["port"]),
            int(self.envoy.extra["admin_port"]), endpoints_file=endpoints,
        )  # fmt: skip
        write_atomically(self.envoy.config, config)

    async def scale(self, request: dict[str, Any]) -> None:
        """To `request["replicas"]` replicas; `last_scale` says what moved."""
        wanted = int(request["replicas"])
        before = self.ring_names()
        started = time.monotonic()
        self.state = "scaling"
        self.last_scale = {"id": request.get("id", ""), "from": len(before), "to": wanted,
                           "sessions": 0, "moved": 0, "status": "scaling"}  # fmt: skip
        self.write()
        try:
            if wanted < 1:
                raise ValueError("a cluster needs at least 1 replica")
            if wanted > len(before):
                taken = {index_of(n) for n in self.replicas}
                free = (i for i in range(1, 10_000) if i not in taken)
                added = [f"r{next(free)}" for _ in range(wanted - len(before))]
                self.progress(f"scaling {len(before)} -> {wanted}: starting {', '.join(added)}")
                await asyncio.gather(*(self.start_replica(name) for name in added))
                after = self.ring_names()
            else:
                after = before[:wanted]
            ids = await asyncio.to_thread(self.redis.session_ids)
            moved = maglev.moved(ids, before, after)
            self.last_scale.update(sessions=len(ids), moved=len(moved))
            self.wanted = wanted
            write_endpoints(self.envoy.directory / "endpoints.json", self.endpoints(after))
            await self.until_ring(set(after), 60.0, exact=True)
            leaving = [self.replicas[n] for n in before if n not in after]
            if leaving:
                self.progress(f"scaling {len(before)} -> {wanted}: draining "
                              f"{', '.join(r.name for r in leaving)}")  # fmt: skip
            await asyncio.gather(*(r.stop(timeout=60.0) for r in leaving))
            for replica in leaving:
                del self.replicas[replica.name]
            self.last_scale["status"] = "done"
        except (RuntimeError, OSError, ValueError) as error:
            self.last_scale["status"] = f"failed: {error}"
        self.last_scale["seconds"] = round(time.monotonic() - started, 3)
        self.state = "running"
        self.write()
        self.progress(
            f"scaled {len(before)} -> {self.wanted}: {self.last_scale['moved']} of "
            f"{self.last_scale['sessions']} sessions moved ({self.last_scale['status']})"
        )

    def _scale_requested(self) -> None:
        try:
            request = json.loads((self.directory / SCALE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            self.progress(f"SIGHUP without a readable {SCALE_FILE}: {error}")
            return
        self.requests.put_nowait(request)

    # ------------------------------------------------------------------ watching

    async def watch(self) -> None:
        """Probe everything every PROBE_INTERVAL; start again what exited unasked."""
        while True:
            children: list[Child] = [self.redis, *self.replicas.values(), self.envoy]
            for child in children:
                if not child.running and child.wanted and child.name not in self.restarting:
                    child.health = "exited"
                    self.restarting.add(child.name)
                    task = asyncio.ensure_future(self.restart(child))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            probes = [c for c in children if c.running and c.name not in self.restarting]
            healths = await asyncio.gather(*(c.probe() for c in probes))
            for child, health in zip(probes, healths, strict=True):
                child.health = health
            try:
                routed = await self.envoy.ring() if self.envoy.running else set()
            except OSError:
                routed = set()
            for name, replica in list(self.replicas.items()):
                replica.extra["in_ring"] = name in routed
            self.write()
            await asyncio.sleep(PROBE_INTERVAL)

    async def restart(self, child: Child) -> None:
        """Start `child` again: Redis and Envoy at once; a replica after REPLICA_PAUSE
        seconds, doubled after each try that fails. On a small machine a starting replica
        (loading torch and its models) takes the cores from the others, which are taking
        over its sessions: the pause lets them do that first."""
        pause = REPLICA_PAUSE if isinstance(child, ReplicaChild) else 0.1
        try:
            while child.wanted and not self.stopping.is_set():
                child.restarts += 1
                self.progress(f"{child.name} (pid {child.pid}) exited; starting it again")
                await asyncio.sleep(pause)
                pause = min(30.0, pause * 2)
                try:
                    if isinstance(child, ReplicaChild):
                        await self.start_replica(child.name)
                    elif isinstance(child, EnvoyChild):
                        await child.start(self.settings.envoy_binary,
                                          self.settings.envoy_concurrency)  # fmt: skip
                        await child.until_ready(60.0)
                    elif isinstance(child, RedisChild):
                        await child.start()
                    return
                except (RuntimeError, OSError) as error:
                    self.progress(f"{child.name} did not start again: {error}")
        finally:
            self.restarting.discard(child.name)

    async def until(self, child: Child, health: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            child.health = await child.probe()
            if child.health == health:
                return
            if not child.running:
                raise RuntimeError(f"{child.name} exited at start; see {child.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} was not {health} after {timeout:g} s")
            await asyncio.sleep(0.05)

    async def until_ring(self, names: set[str], timeout: float, exact: bool = False) -> None:
        """Wait until Envoy routes to every replica of `names` (and, if `exact`, no other)."""
        deadline = time.monotonic() + timeout
        while True:
            routed = await self.envoy.ring()
            if names <= routed and (not exact or routed <= names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy routes to {sorted(routed)}, not {sorted(names)}")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ reporting

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "state": self.state, "dir": str(self.directory), "host": s.host,
            "port": self.envoy.extra["port"], "admin_port": self.envoy.extra["admin_port"],
            "replicas": self.wanted, "store": self.redis.url, "last_scale": self.last_scale,
            "supervisor": {"pid": os.getpid()},
            "processes": [
                c.describe() for c in (self.redis, *self.replicas.values(), self.envoy)
                if c.process is not None
            ],
        }  # fmt: skip

    def write(self) -> None:
        """cluster.json, if anything in it changed; and the replicas Prometheus scrapes."""
        targets = {n: f"127.0.0.1:{r.extra['metrics_port']}" for n, r in self.replicas.items()
                   if r.wanted and r.extra["metrics_port"]}  # fmt: skip
        if targets != self.targets:
            self.targets = targets
            prometheus.write_targets(self.directory / "prometheus-targets.json", targets)
        state = self.describe()
        text = json.dumps(state, sort_keys=True)
        if text != self.written:
            self.written = text
            write_state(self.directory, state)

    def progress(self, message: str) -> None:
        print(f"memserve cluster: {message}", file=sys.stderr, flush=True)

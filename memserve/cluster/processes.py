"""The processes of a cluster: Redis, the replicas and Envoy, each a child of `memserve
cluster` with its log in DIR/logs, started, probed for health and stopped by PID.

Children are started through `setpriv --pdeathsig TERM` where it exists, so that if the
supervisor itself dies (even by SIGKILL) they are told to stop rather than left serving
with nobody watching them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROBE_TIMEOUT = 1.0  # seconds a health probe may take before the process is "unresponsive"


@dataclass
class Child:
    """One process the supervisor runs (and runs again if it exits unasked)."""

    role: str
    name: str
    log: Path
    process: asyncio.subprocess.Process | None = None
    health: str = "starting"
    restarts: int = 0
    started: float = 0.0
    wanted: bool = True  # False once asked to stop: its exit is not a failure
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        wrapper = shutil.which("setpriv")
        if wrapper is not None:
            command = [wrapper, "--pdeathsig", "TERM", "--", *command]
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        self.started = time.time()
        self.health = "starting"

    def send(self, number: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(number)

    async def stop(self, number: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Ask it to stop; SIGKILL if it has not after `timeout` seconds."""
        self.wanted = False
        if not self.running:
            self.health = "stopped"
            return
        assert self.process is not None
        self.send(number)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        self.health = "stopped"

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.role, "name": self.name, "pid": self.pid, "health": self.health,
            "restarts": self.restarts, "started": self.started, "log": str(self.log),
            **self.extra,
        }  # fmt: skip

    async def probe(self) -> str:
        """serving, not_serving or unresponsive."""
        raise NotImplementedError


class RedisChild(Child):
    """Debian's redis-server on a Unix socket in DIR/redis: append-only file, fsync always."""

    def __init__(self, directory: Path, logs: Path) -> None:
        super().__init__("redis", "redis", logs / "redis.log")
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.extra["socket"] = str(self.socket)
        self.client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise OSError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.spawn([
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--logfile", "",
        ])  # fmt: skip
        self.client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=PROBE_TIMEOUT)

    async def probe(self) -> str:
        if self.client is None:
            return "starting"
        try:
            return "serving" if await asyncio.to_thread(self.client.ping) else "not_serving"
        except (redis.exceptions.RedisError, OSError):
            return "unresponsive"

    def session_ids(self) -> list[str]:
        """Every session the store holds now."""
        assert self.client is not None
        members = self.client.smembers("memserve:sessions")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


class ReplicaChild(Child):
    """`memserve serve --replica NAME` on the shared store; its ports are known once it
    logs its "serving" line (0 asks for any free port, and a restart asks for the same)."""

    def __init__(self, name: str, logs: Path, port: int, metrics_port: int) -> None:
        super().__init__("replica", name, logs / f"{name}.log")
        self.extra.update(port=port, metrics_port=metrics_port, in_ring=False)
        self.channel: grpc.aio.Channel | None = None
        self.log_offset = 0

    @property
    def port(self) -> int:
        return int(self.extra["port"])

    async def start(self, store: str, park_dir: Path, serving: list[str]) -> None:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        await self.spawn([
            sys.executable, "-m", "memserve", "serve", "--replica", self.name, "--store", store,
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-host", "127.0.0.1",
            "--metrics-port", str(self.extra["metrics_port"]), "--park-dir", str(park_dir),
            *serving,
        ])  # fmt: skip
        self.extra["in_ring"] = False

    def serving_event(self) -> dict[str, Any] | None:
        """The "serving" line this start logged, if it has yet."""
        with open(self.log, "rb") as log:
            log.seek(self.log_offset)
            for line in log:
                if line.startswith(b"{") and b'"event": "serving"' in line:
                    event: dict[str, Any] = json.loads(line)
                    return event
        return None

    async def until_serving(self, timeout: float) -> None:
        """Wait for its "serving" line (reading its log as it grows); learn its ports."""
        deadline = time.monotonic() + timeout
        while (event := self.serving_event()) is None:
            if not self.running:
                raise RuntimeError(f"replica {self.name} exited at start; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not start in {timeout:g} s")
            await asyncio.sleep(0.1)
        self.extra.update(port=int(event["port"]), metrics_port=int(event["metrics_port"]))
        if self.channel is not None:
            await self.channel.close()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.enable_http_proxy", 0)]
        )

    async def probe(self) -> str:
        if self.channel is None or not self.running:
            return "starting"
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "unresponsive"
            return "not_serving"
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return "serving" if serving else "not_serving"


class EnvoyChild(Child):
    """Envoy with the generated configuration; its admin address is written to a file."""

    def __init__(self, directory: Path, logs: Path, port: int, admin_port: int) -> None:
        super().__init__("envoy", "envoy", logs / "envoy.log")
        self.directory = directory
        self.config = directory / "envoy.yaml"
        self.admin_file = directory / "admin-address"
        self.extra.update(port=port, admin_port=admin_port)

    async def start(self, binary: str, concurrency: int) -> None:
        self.admin_file.unlink(missing_ok=True)
        await self.spawn([
            binary, "-c", str(self.config), "--disable-hot-restart", "--concurrency",
            str(concurrency), "--admin-address-path", str(self.admin_file), "--log-level",
            "warning", "--log-path", str(self.log),
        ])  # fmt: skip

    def admin(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.extra['admin_port']}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=PROBE_TIMEOUT) as reply:
            body: bytes = reply.read()
        return body

    async def until_ready(self, timeout: float) -> None:
        """Wait for its admin address, then learn the listener's port (asked 0: any)."""
        deadline = time.monotonic() + timeout
        while not self.admin_file.exists() or not self.admin_file.read_text().strip():
            if not self.running:
                raise RuntimeError(f"envoy exited at start; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy did not start in {timeout:g} s; see {self.log}")
            await asyncio.sleep(0.05)
        self.extra["admin_port"] = int(self.admin_file.read_text().strip().rsplit(":", 1)[1])
        listeners = json.loads(await asyncio.to_thread(self.admin, "/listeners?format=json"))
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.extra["port"] = int(address["port_value"])

    async def probe(self) -> str:
        try:
            await asyncio.to_thread(self.admin, "/ready")
        except OSError:
            return "unresponsive" if self.running else "starting"
        return "serving"

    async def ring(self) -> set[str]:
        """The replicas (by hash key, i.e. name) Envoy routes to now: healthy, not ejected."""
        return routed(json.loads(await asyncio.to_thread(self.admin, "/clusters?format=json")))


def routed(clusters: dict[str, Any]) -> set[str]:
    """The hosts (by hash key, i.e. name) that Envoy's `/clusters?format=json` says it routes
    to: no health flag raised (failed check, outlier ejection, pending first check)."""
    names = set()
    for cluster in clusters.get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            status = host.get("health_status", {})
            flags = [k for k, v in status.items() if k != "eds_health_status" and v is True]
            eds = status.get("eds_health_status", "HEALTHY") in ("HEALTHY", "UNKNOWN")
            if not flags and eds:
                names.add(host.get("hostname") or _address(host))
    return names


def _address(host: dict[str, Any]) -> str:
    socket = host["address"]["socket_address"]
    return f"{socket['address']}:{socket['port_value']}"

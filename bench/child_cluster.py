"""A real `memserve cluster` (Redis, replicas, Envoy) in a child process on loopback ports,
known through its DIR/cluster.json; its processes are signalled by the PIDs written there.
Calls go through Envoy with the session header, as memserve's clients send it, or straight
to one replica. Used by tests/cluster and bench/cluster.py (as bench/child_server.py is for
one server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.child_server import ROOT, child_env
from clients.channel import SESSION_HEADER
from memserve.cluster.maglev import Maglev
from memserve.cluster.processes import routed
from protos.memserve_pb2_grpc import MemServeStub

START_SECONDS = 300.0


class Cluster:
    """`memserve cluster --port 0 --dir DIR ARGS...`; `start` returns once it runs."""

    def __init__(self, directory: Path, replicas: int, *args: str) -> None:
        self.directory = directory
        self.command = [
            sys.executable, "-m", "memserve", "cluster", "--port", "0", "--dir", str(directory),
            "--replicas", str(replicas), *args,
        ]  # fmt: skip
        self.log_path = directory.parent / f"{directory.name}-supervisor.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.channels: list[grpc.Channel] = []
        self._state: dict[str, Any] = {}

    def start(self) -> Cluster:
        env = child_env()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        self.wait_for(lambda s: s.get("state") == "running", START_SECONDS, "start")
        return self

    # ------------------------------------------------------------------ its state

    def state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, json.JSONDecodeError):  # not written yet
            self._state = json.loads((self.directory / "cluster.json").read_text())
        return self._state

    def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], seconds: float, what: str
    ) -> dict[str, Any]:
        """The state once `condition` holds of it (cluster.json is rewritten at every
        change the supervisor sees, four times a second at most)."""
        deadline = time.monotonic() + seconds
        while not condition(state := self.state()):
            assert self.process is not None and self.process.poll() is None, (
                f"memserve cluster exited waiting for {what}:\n{self.log_text()}"
            )
            assert time.monotonic() < deadline, f"no {what} in {seconds} s: {state}"
            time.sleep(0.05)
        return state

    def healthy(self, replicas: int | None = None) -> dict[str, Any]:
        """The state once every process serves and every replica is in Envoy's routing."""

        def whole(state: dict[str, Any]) -> bool:
            names = self.replica_names(state)
            return (
                state.get("state") == "running"
                and (replicas is None or len(names) == replicas)
                and all(p["health"] == "serving" for p in state["processes"])
                and all(p.get("in_ring") for p in state["processes"] if p["role"] == "replica")
            )

        return self.wait_for(whole, START_SECONDS, "healthy cluster")

    def process_of(self, name: str) -> dict[str, Any]:
        return next(p for p in self.state()["processes"] if p["name"] == name)

    @staticmethod
    def replica_names(state: dict[str, Any]) -> list[str]:
        return [p["name"] for p in state.get("processes", []) if p["role"] == "replica"]

    def table(self) -> Maglev:
        """Envoy's table over the replicas now in its routing."""
        return Maglev(self.replica_names(self.state()))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def replica_events(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        """A replica's structured log lines from byte `since` of its log (all its starts)."""
        path = self.directory / "logs" / f"{name}.log"
        events = []
        with open(path, "rb") as log:
            log.seek(since)
            for line in log:
                if line.startswith(b"{"):
                    try:
                        events.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # being written
        return events

    def wait_for_event(
        self,
        name: str,
        since: int,
        match: Callable[[dict[str, Any]], bool],
        what: str,
        seconds: float = 30.0,
    ) -> dict[str, Any]:
        """The first of a replica's log lines from byte `since` that `match` holds of, once
        it is written (within `seconds`)."""
        deadline = time.monotonic() + seconds
        while not (found := [e for e in self.replica_events(name, since) if match(e)]):
            assert time.monotonic() < deadline, f"no {what} in {name}'s log"
            time.sleep(0.05)
        return found[0]

    def log_sizes(self) -> dict[str, int]:
        logs = self.directory / "logs"
        return {n: (logs / f"{n}.log").stat().st_size for n in self.replica_names(self.state())}

    # ------------------------------------------------------------------ calls

    def channel(self, port: int | None = None) -> grpc.Channel:
        """A channel to Envoy (or to a replica's `port`), closed at stop."""
        target = f"127.0.0.1:{self.state()['port'] if port is None else port}"
        channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        self.channels.append(channel)
        return channel

    def stub(self, replica: str | None = None) -> MemServeStub:
        port = None if replica is None else int(self.process_of(replica)["port"])
        return MemServeStub(self.channel(port))  # type: ignore[no-untyped-call]

    def envoy_admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.state()['admin_port']}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as reply:
            return str(reply.read().decode())

    def routed(self) -> set[str]:
        """The replicas Envoy routes to at this moment, asked of Envoy itself (cluster.json
        says what the supervisor saw at its last probe)."""
        return routed(json.loads(self.envoy_admin("/clusters?format=json")))

    def wait_routed(self, names: set[str], seconds: float = 60.0) -> None:
        """Until Envoy itself routes to every replica of `names`."""
        self.wait_for(lambda _: names <= self.routed(), seconds, f"{sorted(names)} routed")

    def envoy_stats(self, *words: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names contain any of `words` (from its admin)."""
        lines = self.envoy_admin("/stats").splitlines()
        stats = {}
        for line in lines:
            name, _, value = line.partition(": ")
            if any(w in name for w in words) and value.strip().isdigit():
                stats[name] = int(value)
        return stats

    def metrics_url(self, replica: str) -> str:
        return f"http://127.0.0.1:{self.process_of(replica)['metrics_port']}/metrics"

    # ------------------------------------------------------------------ commands

    def signal(self, name: str, number: int) -> int:
        """Send a process of the cluster (by name) a signal; returns its PID."""
        pid = int(self.process_of(name)["pid"])
        os.kill(pid, number)
        return pid

    def command_line(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`memserve cluster ACTION ... --dir DIR`."""
        return subprocess.run(
            [sys.executable, "-m", "memserve", "cluster", *args, "--dir", str(self.directory)],
            capture_output=True, text=True, cwd=ROOT, timeout=START_SECONDS,
        )  # fmt: skip

    def stop(self) -> int | None:
        """SIGTERM to the supervisor; if it is not done in 120 s, SIGKILL to it and to every
        process cluster.json names."""
        for channel in self.channels:
            channel.close()
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            for process in self.state().get("processes", []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(process["pid"]), signal.SIGKILL)
            self.process.wait()
            raise


def session_metadata(session_id: str) -> tuple[tuple[str, str]]:
    """What memserve's clients send with every call naming a session."""
    return ((SESSION_HEADER, session_id),)

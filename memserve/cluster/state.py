"""`DIR/cluster.json`: what `memserve cluster` started and how each part is, rewritten (by an
atomic rename) whenever something changes, for `memserve cluster status`, scripts and tests.

    {"state": "running", "supervisor": {"pid": ...}, "port": 50051, "admin_port": 9901,
     "replicas": 3, "store": "unix:///.../redis.sock",
     "processes": [{"role": "redis", "name": "redis", "pid": ..., "health": "serving", ...},
                   {"role": "replica", "name": "r1", "pid": ..., "port": ..., "metrics_port":
                    ..., "health": "serving", "in_ring": true, "restarts": 0, ...},
                   {"role": "envoy", "name": "envoy", ...}],
     "last_scale": {"id": ..., "from": 2, "to": 3, "sessions": 300, "moved": 98, ...}}

`health` is one of: starting, serving, not_serving (it answers, but says it cannot serve:
draining, or its store is down), unresponsive (no answer in time: frozen, or overloaded),
exited (it is being started again), stopped. A replica's `in_ring` says whether Envoy
routes calls to it now.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from memserve.cluster.envoy import write_atomically

STATE_FILE = "cluster.json"
SCALE_FILE = "scale.json"  # `memserve cluster scale` asks through it (with SIGHUP)

HEALTHY = "serving"


def state_path(directory: Path) -> Path:
    return directory / STATE_FILE


def write_state(directory: Path, state: dict[str, Any]) -> None:
    state = {**state, "updated": time.time()}
    write_atomically(state_path(directory), json.dumps(state, indent=1, sort_keys=True) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    """The cluster's state file (OSError naming it if there is none)."""
    path = state_path(directory)
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise OSError(f"no cluster in {directory}: {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise OSError(f"{path} is not JSON: {error}") from None
    return state


def alive(pid: int) -> bool:
    """Whether a process of this id exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: trust kill(0)


def problems(state: dict[str, Any]) -> list[str]:
    """What is down or out of the ring, one line each (none: the whole is healthy)."""
    found = []
    supervisor = int(state.get("supervisor", {}).get("pid", 0))
    if state.get("state") != "running":
        found.append(f"the cluster is {state.get('state')}")
    if not supervisor or not alive(supervisor):
        found.append(f"its supervisor (pid {supervisor}) is not running")
    for process in state.get("processes", []):
        name, health = process["name"], process.get("health")
        if health != HEALTHY:
            found.append(f"{name} is {health}")
        elif not alive(int(process["pid"])):
            found.append(f"{name} (pid {process['pid']}) is gone")
        elif process.get("role") == "replica" and not process.get("in_ring", False):
            found.append(f"{name} is not in Envoy's ring")
    replicas = [p for p in state.get("processes", []) if p.get("role") == "replica"]
    if len(replicas) != state.get("replicas"):
        found.append(f"{len(replicas)} replicas run, {state.get('replicas')} wanted")
    return found


def describe(state: dict[str, Any]) -> str:
    """`memserve cluster status`'s table."""
    lines = [
        f"cluster in {state.get('dir')}: {state.get('state')}, {state.get('replicas')} "
        f"replicas wanted, gRPC on {state.get('host')}:{state.get('port')} through Envoy "
        f"(admin on 127.0.0.1:{state.get('admin_port')}), supervisor pid "
        f"{state.get('supervisor', {}).get('pid')}",
        f"{'ROLE':8} {'NAME':6} {'PID':>8} {'PORT':>6} {'METRICS':>7} {'HEALTH':12} "
        f"{'RING':5} {'RESTARTS':>8}",
    ]
    for p in state.get("processes", []):
        ring = "" if p.get("role") != "replica" else ("in" if p.get("in_ring") else "out")
        metrics = p.get("metrics_port") or p.get("admin_port") or ""
        lines.append(
            f"{p['role']:8} {p['name']:6} {p.get('pid', ''):>8} {p.get('port', '') or '':>6} "
            f"{metrics:>7} {p.get('health', ''):12} {ring:5} {p.get('restarts', 0):>8}"
        )
    scale = state.get("last_scale")
    if scale:
        lines.append(
            f"last scale: {scale['from']} -> {scale['to']} replicas, {scale['moved']} of "
            f"{scale['sessions']} sessions moved ({scale['status']})"
        )
    return "\n".join(lines)

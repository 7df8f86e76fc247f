"""`memserve cluster` (run one), `memserve cluster status` and `memserve cluster scale N`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

# Settings `memserve cluster` gives each replica itself; every other one is passed through.
OWNED = ("host", "port", "metrics_host", "metrics_port", "replica", "store", "park_dir")
DEFAULT_DIR = "memserve-cluster"


def add_cluster_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from memserve.flags import add_setting_flags

    cluster = commands.add_parser(
        "cluster",
        help="run N replicas behind Envoy on one Redis, on this machine",
        description=(
            "Run a cluster on this machine, in the foreground: Redis (append-only, fsync "
            "always, in DIR/redis), N replicas (`memserve serve --replica rI --store "
            "unix://DIR/redis/redis.sock`) and Envoy in front on HOST:PORT, routing each "
            "session's calls to one replica by the x-memserve-session header. A process that "
            "exits is started again. DIR/cluster.json says what runs and how it is; "
            "DIR/logs has every log. SIGTERM or SIGINT stops it all in order: the replicas "
            "drain, then Envoy, then Redis stop. docs/cluster.md has the details."
        ),
        epilog=(
            "Examples: memserve cluster --replicas 3 --port 50051 --dir /var/lib/memserve "
            "--models ntm-copy;  memserve cluster status --dir /var/lib/memserve;  memserve "
            "cluster scale 4 --dir /var/lib/memserve"
        ),
    )
    cluster.add_argument("--replicas", type=int, default=3, help="replicas to run [default: 3]")
    cluster.add_argument(
        "--dir", default=DEFAULT_DIR,
        help=f"where the cluster keeps its state, store, logs and configuration "
        f"[default: ./{DEFAULT_DIR}]",
    )  # fmt: skip
    cluster.add_argument("--host", default="127.0.0.1", help="address Envoy listens on")
    cluster.add_argument(
        "--port", type=int, default=50051,
        help="Envoy's gRPC port, the cluster's address (0: any free port, and any free "
        "ports for everything else too) [default: 50051]",
    )  # fmt: skip
    cluster.add_argument(
        "--admin-port", type=int, default=None,
        help="Envoy's admin port, on 127.0.0.1 [default: 9901]",
    )  # fmt: skip
    cluster.add_argument(
        "--replica-port", type=int, default=None,
        help="gRPC port of replica r1; rI gets this + I - 1 [default: PORT + 1]",
    )  # fmt: skip
    cluster.add_argument(
        "--replica-metrics-port", type=int, default=None,
        help="/metrics port of replica r1; rI gets this + I - 1 [default: 9464]",
    )  # fmt: skip
    cluster.add_argument(
        "--envoy-concurrency", type=int, default=1,
        help="Envoy's worker threads [default: 1]",
    )  # fmt: skip
    cluster.add_argument("--config", metavar="FILE", help="TOML file of every replica's settings")
    serving = cluster.add_argument_group(
        "serving options", "passed to every replica (see `memserve serve --help`)"
    )
    add_setting_flags(serving, skip=OWNED)
    cluster.set_defaults(handler=_run, action=None)

    actions = cluster.add_subparsers(dest="action", metavar="ACTION")
    status = actions.add_parser(
        "status",
        help="print the health of every process of a running cluster",
        description=(
            "Print the health of every process of the cluster in DIR (from DIR/cluster.json, "
            "which the running `memserve cluster` keeps current). Exits 1 if anything is not "
            "serving, a replica is out of Envoy's ring, or the cluster itself is not running."
        ),
    )
    status.add_argument("--dir", dest="action_dir", default=DEFAULT_DIR, help="the cluster's DIR")
    status.add_argument("--json", action="store_true", help="print cluster.json as it is")
    status.set_defaults(handler=_status)
    scale = actions.add_parser(
        "scale",
        help="add or remove replicas of a running cluster",
        description=(
            "Ask the cluster in DIR to run N replicas and wait until it does. New replicas "
            "join Envoy's ring once healthy; leaving ones are taken out of it, then drained. "
            "About 1/N of the sessions move, each brought back once from the store by its new "
            "replica on its next call; the command says how many."
        ),
    )
    scale.add_argument("replicas", type=int, metavar="N", help="replicas wanted")
    scale.add_argument("--dir", dest="action_dir", default=DEFAULT_DIR, help="the cluster's DIR")
    scale.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait [default: 900]"
    )
    scale.set_defaults(handler=_scale)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from memserve.cluster.envoy import envoy_binary
    from memserve.cluster.supervisor import Settings, Supervisor
    from serving import config

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    flags = {name: getattr(args, name) for name in config.FIELDS if name not in OWNED}
    config.load({**flags, "replica": "r1", "store": "unix:///check"}, config_file=args.config)
    serving = [] if args.config is None else ["--config", args.config]
    for name, value in flags.items():
        if value is not None:
            serving += ["--" + name.replace("_", "-"), str(value)]
    any_port = args.port == 0
    settings = Settings(
        directory=Path(args.dir),
        replicas=args.replicas,
        host=args.host,
        port=args.port,
        admin_port=_port(args.admin_port, 0 if any_port else 9901),
        replica_port=_port(args.replica_port, 0 if any_port else args.port + 1),
        metrics_port=_port(args.replica_metrics_port, 0 if any_port else 9464),
        serving=serving,
        envoy_binary=envoy_binary(),
        envoy_concurrency=args.envoy_concurrency,
    )
    return asyncio.run(Supervisor(settings).run())


def _port(given: int | None, default: int) -> int:
    port = default if given is None else given
    if not 0 <= port <= 65535:
        raise ValueError(f"a port must be in 0..65535, got {port}")
    return port


def _status(args: argparse.Namespace) -> int:
    from memserve.cluster.state import describe, problems, read_state

    state = read_state(Path(args.action_dir))
    if args.json:
        print(json.dumps(state, indent=1, sort_keys=True))
    else:
        print(describe(state))
    found = problems(state)
    for problem in found:
        print(f"down: {problem}", file=sys.stderr)
    return 1 if found else 0


def _scale(args: argparse.Namespace) -> int:
    from memserve.cluster.envoy import write_atomically
    from memserve.cluster.state import SCALE_FILE, alive, read_state

    directory = Path(args.action_dir)
    state = read_state(directory)
    pid = int(state.get("supervisor", {}).get("pid", 0))
    if state.get("state") not in ("running", "scaling") or not pid or not alive(pid):
        raise OSError(f"the cluster in {directory} is not running ({state.get('state')})")
    if args.replicas < 1:
        raise ValueError(f"N must be >= 1, got {args.replicas}")
    request = {"replicas": args.replicas, "id": uuid.uuid4().hex}
    write_atomically(directory / SCALE_FILE, json.dumps(request) + "\n")
    os.kill(pid, signal.SIGHUP)
    print(f"asked the cluster in {directory} for {args.replicas} replicas", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    while True:
        state = read_state(directory)
        scale = state.get("last_scale") or {}
        if scale.get("id") == request["id"] and scale.get("status") != "scaling":
            break
        if not alive(pid):
            raise OSError("the cluster's supervisor exited")
        if time.monotonic() > deadline:
            raise OSError(f"the cluster did not scale in {args.timeout:g} s")
        time.sleep(0.1)
    print(
        f"{scale['from']} -> {scale['to']} replicas in {scale.get('seconds', 0):.1f} s: "
        f"{scale['moved']} of {scale['sessions']} sessions moved "
        f"({100 * scale['moved'] / max(1, scale['sessions']):.0f}%), each brought back once "
        f"by its new replica on its next call ({scale['status']})"
    )
    return 0 if scale["status"] == "done" else 1

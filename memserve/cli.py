"""The `memserve` command: one entry point whose subcommands live in their own layers.

Subcommand modules are imported only when run, so `memserve --help` stays fast and a
command never loads layers it does not use.
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memserve import __version__
from memserve.flags import add_setting_flags

if TYPE_CHECKING:
    from serving.worker_process import WorkerProcess


def _version(_: argparse.Namespace) -> int:
    import torch

    from kernels import backend

    print(f"memserve {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    if backend.TRITON_AVAILABLE:
        import triton

        print(f", triton {triton.__version__}", end="")
    print(f"\nkernel backend: {backend.describe()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from memserve.demo import run_demo

    return run_demo(
        sessions=args.sessions,
        batch=args.batch,
        rows=args.rows,
        width=args.width,
        steps=args.steps,
        seed=args.seed,
    )


def _serve(args: argparse.Namespace) -> int:
    from serving import config, logs, startup

    if args.print_config:
        flags = {name: getattr(args, name) for name in config.FIELDS}
        print(config.example_toml(config.load(flags, config_file=args.config)), end="")
        return 0
    settings = config.load(
        {name: getattr(args, name) for name in config.FIELDS}, config_file=args.config
    )
    logs.configure(settings.log_level)
    # Until the server drains on them itself, SIGTERM and SIGINT stop the start: the
    # models' processes are stopped and nothing is left behind.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _stop_starting)
    # The models' processes first: they import torch and load their weights while this one
    # imports the server (torch too), instead of after it.
    started: dict[str, WorkerProcess] = {}
    try:
        started = startup.start_workers(settings)
        from serving import server
        from serving.durable.base import StoreUnavailable

        _raise_if_stopped()  # a signal whose exception an import swallowed
        try:
            return server.serve(settings, started)
        except StoreUnavailable as error:  # e.g. its Redis is down at start: not a crash
            print(f"memserve serve: error: {error}", file=sys.stderr)
            return 1
    except StopStartingError as stop:
        print(f"memserve serve: stopped by {stop} before serving", file=sys.stderr)
        return 0
    finally:  # a server that failed before taking them over (its store, its port) leaves none
        for worker in started.values():
            worker.kill()


class StopStartingError(BaseException):
    """SIGTERM or SIGINT while `memserve serve` was starting. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (ours or a library's,
    e.g. around an optional import) takes it for an error and goes on starting."""


_signals_while_starting: list[str] = []


def _stop_starting(number: int, frame: object) -> None:
    _signals_while_starting.append(signal.Signals(number).name)
    raise StopStartingError(_signals_while_starting[0])


def _raise_if_stopped() -> None:
    """StopStartingError if a signal came even though its exception did not get here: one
    raised where Python ignores exceptions (a `__del__`, a callback) is only printed."""
    if _signals_while_starting:
        raise StopStartingError(_signals_while_starting[0])


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    serve = commands.add_parser(
        "serve",
        help="serve models over gRPC (sessions, batched steps, Prometheus metrics)",
        description=(
            "Serve models over gRPC: memserve.v1.MemServe, grpc.health.v1 and server "
            "reflection on HOST:PORT, Prometheus metrics on HOST:METRICS_PORT/metrics. "
            "Every setting can also come from the environment (MEMSERVE_<NAME>) or a TOML "
            "file (--config or $MEMSERVE_CONFIG, keys named as the settings); flags win over "
            "the environment, which wins over the file. SIGTERM or SIGINT drains: health "
            "turns NOT_SERVING, calls in flight get --grace seconds, sessions are written to "
            "the store, exit 0 (1 if some could not be, or a model's process died)."
        ),
        epilog="Example: memserve serve --models ntm-copy --port 50051 --slots 1024",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file of settings")
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings that would be used, as TOML, and exit",
    )
    add_setting_flags(serve)
    serve.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `memserve` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="memserve",
        description="Serve memory-augmented sequence models (NTM, DNC, VMED) to many sessions.",
        epilog="Run 'memserve COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"memserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    version = commands.add_parser(
        "version", help="print versions and the kernel backend this machine will use"
    )
    version.set_defaults(handler=_version)

    demo = commands.add_parser(
        "demo",
        help="step a pool of NTM memories on this machine's backend, checked against float64",
        description=(
            "Allocate a pool of NTM session memories, run batched memory steps on the "
            "kernel backend this machine selects (see 'memserve version'), and compare every "
            "step with the float64 PyTorch reference."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--sessions", type=int, default=64, help="slots in the pool")
    demo.add_argument("--batch", type=int, default=16, help="sessions stepped per launch")
    demo.add_argument("--rows", type=int, default=128, help="memory rows N")
    demo.add_argument("--width", type=int, default=20, help="memory row width M")
    demo.add_argument("--steps", type=int, default=10, help="batched steps to run")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(handler=_demo)

    add_serve_parser(commands)

    from memserve.cluster.cli import add_cluster_parser

    add_cluster_parser(commands)

    check = commands.add_parser(
        "healthcheck",
        help="exit 0 if a server answers SERVING on grpc.health.v1 (a container's probe)",
        description=(
            "Ask a memserve server's grpc.health.v1 service for its status: exit 0 if it is "
            "SERVING, 1 otherwise (not serving, unreachable, too slow). For a container's "
            "HEALTHCHECK; Kubernetes probes gRPC health natively."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    check.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    check.add_argument("--service", default="", help="service name ('': the whole server)")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    check.add_argument(
        "--tls", action="store_true", help="speak TLS (the server's --tls-cert), system roots"
    )
    check.set_defaults(handler=_healthcheck)

    keys = commands.add_parser(
        "keys",
        help="make API keys for --auth-keys",
        description="Make API keys for a server's --auth-keys file (docs/security.md).",
    )
    key_commands = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    new_key = key_commands.add_parser(
        "new",
        help="print a fresh key, and the line that names it in the keys file",
        description=(
            "Print a fresh API key (256 random bits) for the client, and its SHA-256 as the "
            "keys file writes it: put that in the tenant's keys list, keep the key itself "
            "with the client only."
        ),
    )
    new_key.set_defaults(handler=_new_key)

    from clients.chat import add_chat_parser

    add_chat_parser(commands)

    from clients.loadgen import add_loadgen_parser

    add_loadgen_parser(commands)

    train = commands.add_parser(
        "train",
        help="train a model on a task into a checkpoint directory",
        description="Train a model on a task. Run 'memserve train TASK --help' for its options.",
    )
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    from memserve.train import add_copy_parser, add_dialogue_parser, add_recall_parser

    add_copy_parser(tasks)
    add_recall_parser(tasks)
    add_dialogue_parser(tasks)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a trained model on a task",
        description="Evaluate a model on a task. Run 'memserve eval TASK --help' for options.",
    )
    eval_tasks = evaluate.add_subparsers(dest="task", metavar="TASK", required=True)
    from memserve.evaluate import add_copy_parser as add_eval_copy_parser
    from memserve.evaluate import add_dialogue_parser as add_eval_dialogue_parser
    from memserve.evaluate import add_recall_parser as add_eval_recall_parser

    add_eval_copy_parser(eval_tasks)
    add_eval_recall_parser(eval_tasks)
    add_eval_dialogue_parser(eval_tasks)
    return parser


def _healthcheck(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.enable_http_proxy", 0)]
    channel = (
        grpc.secure_channel(args.target, grpc.ssl_channel_credentials(), options)
        if args.tls
        else grpc.insecure_channel(args.target, options)
    )
    with channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
        except grpc.RpcError as error:
            print(f"{args.target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.target}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _new_key(args: argparse.Namespace) -> int:
    from serving.tenants import hash_key, new_key

    key = new_key()
    print(f"key:  {key}")
    print(f'line: "{hash_key(key)}"')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `memserve` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # What was typed after `memserve`, for the provenance that training and evaluation record.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code: int = args.handler(args)
    except ValueError as error:  # bad arguments or input files: nothing was done
        print(f"memserve {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ArithmeticError) as error:  # the file system, or a diverging run
        print(f"memserve {args.command}: error: {error}", file=sys.stderr)
        return 1
    return code

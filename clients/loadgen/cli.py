"""The `memserve loadgen` command line: `memserve loadgen step ...` and `memserve loadgen
chat ...`, their options and checks, turned into the `Settings` a run works from.

Light on purpose: `memserve --help` imports this module; gRPC, numpy and matplotlib load
only when a run starts (`run.py`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clients import options
from clients.loadgen.settings import Settings
from clients.options import (
    DEFAULT_TARGET,
    nonempty,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)

METRICS_PORT = 9464  # `memserve serve`'s default --metrics-port
DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64,128,256"
STEP_MODEL = "ntm-copy"
CHAT_MODEL = "vmed-chat"


# ---------------------------------------------------------------------------- value checks


def _list_of(item: Callable[[str], Any], what: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse `type` for comma-separated values, each checked by `item`, kept in order,
    duplicates dropped."""

    def convert(text: str) -> tuple[Any, ...]:
        parts = [part.strip() for part in text.split(",")]
        if not parts or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        values: list[Any] = []
        for part in parts:
            try:
                value = item(part)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
            if value not in values:
                values.append(value)
        return tuple(values)

    convert.__name__ = what
    return convert


concurrency_list = _list_of(positive_int, "comma-separated integers >= 1, e.g. 1,4,16")
rate_list = _list_of(positive_float, "comma-separated rates > 0, e.g. 50,100,200")


def target_address(text: str) -> str:
    """HOST:PORT (a port is required: it is what tells a typo from a host name)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def metrics_url_for(target: str) -> str:
    """The default /metrics URL: the target's host on `memserve serve`'s metrics port."""
    host = target.rpartition(":")[0]
    return f"http://{host}:{METRICS_PORT}/metrics"


# ---------------------------------------------------------------------------- parser


def _wrap(text: str) -> str:
    """A paragraph for a raw-formatted description, wrapped as argparse would."""
    return textwrap.fill(text, width=88)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows every default that is a value (not None,
    not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default not in (None, argparse.SUPPRESS) and not isinstance(default, bool)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


DESCRIPTION = """\
Drive a memserve server with many stateful sessions and measure it: latency percentiles
(HdrHistogram), throughput, errors by gRPC status code, and the server's own batch size and
queue wait from its /metrics, for each level of a sweep.

Workloads (each session: CreateSession, K requests, DeleteSession, then the next session):
  step   K Step calls of T random inputs each (a request = one Step call)
  chat   K turns of streamed Generate on a dialogue model (a request = one turn);
         also time to first text piece (TTFT) and between pieces (ITL)

Load shapes:
  --concurrency 1,4,16   closed loop: C workers, each runs sessions back to back
  --rate 50,100          open loop: requests start at t0 + i/R whatever the replies do;
                         latency counts from that intended time (no coordinated omission)

Run 'memserve loadgen WORKLOAD --help' for all options; docs/loadgen.md explains the method."""

EPILOG = """\
examples:
  memserve loadgen step                                 # ntm-copy, C = 1,2,4,...,256
  memserve loadgen step --concurrency 1,8,64 --duration 10 --json out.json --plot out.png
  memserve loadgen step --rate 100,200,400 --steps 20 --steps-per-call 5 --csv levels.csv
  memserve loadgen chat --concurrency 1,4 --turns 3 --max-tokens 24
  memserve loadgen chat --rate 2 --requests 100 --prompts utterances.txt"""

STEP_EPILOG = """\
examples:
  memserve loadgen step --concurrency 1,8,64 --duration 10 --warmup 2
  memserve loadgen step --rate 100,200,400 --max-outstanding 128 --json step.json
  memserve loadgen step --model dnc-recall --steps 50 --steps-per-call 4 --requests 2000
  memserve loadgen step --target 10.0.0.5:50051 --plot latency.png"""

CHAT_EPILOG = """\
examples:
  memserve loadgen chat --concurrency 1,4,16 --turns 4 --max-tokens 32
  memserve loadgen chat --rate 1,2,4 --temperature 0.8 --top-p 0.9 --json chat.json
  memserve loadgen chat --prompts utterances.txt --stop '?' --requests 200"""


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options both workloads share: where, how much load, how long, what to write."""
    where = parser.add_argument_group("server")
    where.add_argument(
        "--target", type=target_address, default=DEFAULT_TARGET, metavar="HOST:PORT",
        help="the server's gRPC address",
    )  # fmt: skip
    where.add_argument(
        "--metrics-url", metavar="URL",
        help="the server's Prometheus page, scraped before and after each level's window "
        f"(default: http://HOST:{METRICS_PORT}/metrics, HOST from --target)",
    )  # fmt: skip
    where.add_argument(
        "--no-metrics", action="store_true", help="do not scrape the server's /metrics"
    )
    where.add_argument(
        "--protocol", choices=("memserve", "kserve"), default="memserve",
        help="memserve: memserve.v1 (Step, Generate); kserve: the v2 inference API, as Triton "
        "clients call it (ModelInfer, ModelStreamInfer; a session is a sequence: "
        "docs/kserve.md)",
    )  # fmt: skip
    where.add_argument(
        "--channels", type=positive_int, default=1, metavar="N",
        help="gRPC channels (connections); sessions use them round robin",
    )  # fmt: skip
    where.add_argument(
        "--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS",
        help="how long to wait for the server at the start",
    )  # fmt: skip
    where.add_argument(
        "--timeout", type=positive_float, default=60.0, metavar="SECONDS",
        help="deadline of every call; a call past it counts as DEADLINE_EXCEEDED",
    )  # fmt: skip
    options.add_connection_options(where)

    shape = parser.add_argument_group("load shape (one of)")
    loops = shape.add_mutually_exclusive_group()
    loops.add_argument(
        "--concurrency", type=concurrency_list, default=DEFAULT_CONCURRENCY, metavar="C,...",
        help="closed loop: one level per C, with C workers each running sessions back to back",
    )  # fmt: skip
    loops.add_argument(
        "--rate", type=rate_list, metavar="R,...",
        help="open loop: one level per R, requests (Step calls or turns) issued at R per "
        "second at fixed times, latency measured from each one's intended start",
    )  # fmt: skip
    shape.add_argument(
        "--max-outstanding", type=positive_int, default=256, metavar="N",
        help="open loop: most requests in flight; a request over it waits (and is counted "
        "late), its latency still measured from its intended start",
    )  # fmt: skip
    shape.add_argument(
        "--drain-timeout", type=nonnegative_float, default=10.0, metavar="SECONDS",
        help="open loop: how long after a level's window requests still waiting for a free "
        "place may be sent; the rest are counted unsent",
    )  # fmt: skip

    control = parser.add_argument_group("run control")
    control.add_argument(
        "--warmup", type=nonnegative_float, default=1.0, metavar="SECONDS",
        help="load before each level's measuring window, not measured",
    )  # fmt: skip
    length = control.add_mutually_exclusive_group()
    length.add_argument(
        "--duration", type=positive_float, default=5.0, metavar="SECONDS",
        help="each level's measuring window",
    )  # fmt: skip
    length.add_argument(
        "--requests", type=positive_int, metavar="N",
        help="measure N requests per level instead of --duration seconds",
    )  # fmt: skip
    control.add_argument(
        "--seed", type=nonnegative_int, default=0,
        help="seed of the inputs, of the prompts' order and of the sessions' samplers",
    )  # fmt: skip
    control.add_argument(
        "--session-ttl", type=positive_float, metavar="SECONDS",
        help="ttl_seconds of every CreateSession (default: the server's); sessions that a "
        "killed run leaves behind expire after it",
    )  # fmt: skip
    control.add_argument(
        "--progress", action=argparse.BooleanOptionalAction,
        help="a live progress line on stderr (default: when stderr is a terminal)",
    )  # fmt: skip

    output = parser.add_argument_group("output (the table always goes to stdout)")
    output.add_argument("--json", type=Path, metavar="FILE", help="write every result as JSON")
    output.add_argument("--csv", type=Path, metavar="FILE", help="write one CSV row per level")
    output.add_argument(
        "--plot", type=Path, metavar="FILE",
        help="write a PNG of latency percentiles (p50, p90, p99, p99.9) against throughput",
    )  # fmt: skip


def add_loadgen_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `memserve loadgen` and its workloads `step` and `chat`."""
    loadgen = commands.add_parser(
        "loadgen",
        help="load generator: latency and throughput of a server under many sessions",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    workloads = loadgen.add_subparsers(dest="workload", metavar="WORKLOAD", required=True)

    step = workloads.add_parser(
        "step",
        help="sessions of K Step calls of T random inputs each",
        description=_wrap(
            "Sessions of K Step calls, each of T inputs [T, input_size] drawn uniformly in "
            "[0, 1) (input_size from ListModels). A request is one Step call; throughput is "
            "also counted in session-steps/s (calls x T)."
        ),
        epilog=STEP_EPILOG,
        formatter_class=_HelpFormatter,
    )
    workload = step.add_argument_group("workload")
    workload.add_argument("--model", default=STEP_MODEL, help="the model to step")
    workload.add_argument(
        "--steps", type=positive_int, default=20, metavar="K",
        help="Step calls per session, between CreateSession and DeleteSession",
    )  # fmt: skip
    workload.add_argument(
        "--steps-per-call", type=positive_int, default=1, metavar="T",
        help="inputs per Step call (the server refuses T over its --max-steps-per-call)",
    )  # fmt: skip
    _add_common_options(step)
    step.set_defaults(handler=_run)

    chat = workloads.add_parser(
        "chat",
        help="multi-turn conversations: K turns of streamed Generate per session",
        description=_wrap(
            "Conversations on a dialogue model: K turns of Generate per session, each a short "
            "utterance (built in, or --prompts). A request is one turn. Besides a turn's "
            "latency (to its final message): the time to the first text piece (TTFT, from the "
            "turn's intended start), the time between pieces (ITL), and generated tokens/s."
        ),
        epilog=CHAT_EPILOG,
        formatter_class=_HelpFormatter,
    )
    workload = chat.add_argument_group("workload")
    workload.add_argument("--model", default=CHAT_MODEL, help="the dialogue model")
    workload.add_argument(
        "--turns", type=positive_int, default=4, metavar="K",
        help="Generate turns per session, between CreateSession and DeleteSession",
    )  # fmt: skip
    workload.add_argument(
        "--prompts", type=Path, metavar="FILE",
        help="utterances, one per line (blank lines skipped) (default: a built-in list of "
        "short everyday utterances)",
    )  # fmt: skip
    sampling = chat.add_argument_group("sampling (sent with every turn)")
    sampling.add_argument(
        "--max-tokens", type=nonnegative_int, default=32, metavar="N",
        help="most tokens per reply; 0: the server's default",
    )  # fmt: skip
    sampling.add_argument(
        "--temperature", type=nonnegative_float, metavar="TEMP",
        help="0 = greedy (default: the server's, 1)",
    )  # fmt: skip
    sampling.add_argument(
        "--top-k", type=nonnegative_int, default=0, metavar="K",
        help="keep the K most likely tokens; 0: all",
    )  # fmt: skip
    sampling.add_argument(
        "--top-p", type=probability, metavar="P",
        help="nucleus sampling mass in (0, 1] (default: the server's, 1)",
    )  # fmt: skip
    sampling.add_argument(
        "--stop", action="append", type=nonempty, metavar="TEXT",
        help="end a reply where TEXT appears (repeatable)",
    )  # fmt: skip
    _add_common_options(chat)
    chat.set_defaults(handler=_run)


# ---------------------------------------------------------------------------- handler


def read_prompts(path: Path) -> tuple[str, ...]:
    """The non-blank lines of `path`, stripped; ValueError if there are none."""
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ValueError(f"--prompts {path}: no utterances in it (one per line)")
    return prompts


def settings_from(args: argparse.Namespace) -> Settings:
    """The `Settings` of parsed arguments (reads --prompts; ValueError if it is empty)."""
    chat = args.workload == "chat"
    prompts: tuple[str, ...] = ()
    source = ""
    if chat:
        from clients.loadgen.workloads import PROMPTS

        if args.prompts is not None:
            prompts, source = read_prompts(args.prompts), str(args.prompts)
        else:
            prompts, source = PROMPTS, "built-in"
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    metrics_url = None if args.no_metrics else args.metrics_url or metrics_url_for(args.target)
    return Settings(
        workload=args.workload,
        model=args.model,
        target=args.target,
        concurrency=() if args.rate else tuple(args.concurrency),
        rates=tuple(args.rate or ()),
        warmup=args.warmup,
        duration=None if args.requests else args.duration,
        requests=args.requests,
        max_outstanding=args.max_outstanding,
        drain_timeout=args.drain_timeout,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        channels=args.channels,
        seed=args.seed,
        session_ttl=args.session_ttl,
        metrics_url=metrics_url,
        progress=progress,
        json_path=args.json,
        csv_path=args.csv,
        plot_path=args.plot,
        tls=options.tls_settings(args),
        protocol=args.protocol,
        token=options.token(args),
        steps=0 if chat else args.steps,
        steps_per_call=0 if chat else args.steps_per_call,
        turns=args.turns if chat else 0,
        prompts=prompts,
        prompts_source=source,
        max_tokens=args.max_tokens if chat else 0,
        temperature=args.temperature if chat else None,
        top_k=args.top_k if chat else 0,
        top_p=args.top_p if chat else None,
        stop=tuple(args.stop or ()) if chat else (),
    )


def without_token(argv: Sequence[str]) -> list[str]:
    """The command line with the value of --token hidden (it goes into the JSON)."""
    words = list(argv)
    for index, word in enumerate(words):
        if word.startswith("--token="):
            words[index] = "--token=***"
        elif word == "--token" and index + 1 < len(words):
            words[index + 1] = "***"
    return words


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    argv = getattr(args, "argv", None)
    command = "memserve " + shlex.join(without_token(argv if argv is not None else sys.argv[1:]))
    from clients.loadgen.run import run

    return run(settings, command)

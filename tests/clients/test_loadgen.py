"""`memserve loadgen` against a real server (ntm-copy and the small VMED): its counts agree
with the server's own, its files are what they claim, the open loop keeps its schedule and
measures from intended times, errors are counted by status code, and --help tells the
truth. The schedules are also driven alone, by a fake target whose calls are slow.

Speed is not asserted (GUIDE: timing targets live in benchmarks): only counts, and latency
lower bounds that follow from the fake's sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.child_server import ServerProcess
from clients.loadgen import cli as loadgen_cli
from clients.loadgen import report, schedule, server_metrics
from clients.loadgen.progress import Progress
from clients.loadgen.recording import OK, Outcome, Recorder
from clients.loadgen.schedule import (
    Level,
    Plan,
    Session,
    SessionRefused,
    closed_loop,
    now,
    open_loop,
)
from memserve.cli import build_parser, main
from tests.clients.fake_server import FakeServer
from tests.clients.servers import (
    MAX_STEPS,
    TINY,
    Watched,
    served,
    server_counts,
    settled_counts,
)

METHODS = ("ListModels", "CreateSession", "Step", "Generate", "DeleteSession")
# The progress line of a level in its window: its label, seconds measured, requests ok.
MEASURING = re.compile(r"(\S+) measuring\s+\[[#.]+\]\s+([\d.]+)/[\d.]+ s\s+(\d+) ok ")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory) as process:
        yield process


def loadgen(server: ServerProcess, workload: str, *args: str) -> int:
    """`memserve loadgen WORKLOAD` in this process, pointed at `server`."""
    return main(["loadgen", workload, "--target", server.target, "--metrics-url",
                 server.metrics_url, "--no-progress", *args])  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- real server


def test_closed_loop_sweep_agrees_with_the_server_and_writes_its_files(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server_counts(server)
    files = {kind: tmp_path / f"run.{kind}" for kind in ("json", "csv", "png")}
    code = loadgen(server, "step", "--concurrency", "1,4", "--duration", "1", "--warmup", "0.3",
                   "--steps", "5", "--steps-per-call", "2", "--json", str(files["json"]),
                   "--csv", str(files["csv"]), "--plot", str(files["png"]))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "C=1" in printed and "C=4" in printed
    assert "the server counted the same calls over the run" in printed

    record = json.loads(files["json"].read_text())
    sent = record["requests_sent"]
    assert settled_counts(server, before, sent) == sent  # every call, warm-up and teardown too
    assert set(sent) == {"ListModels", "CreateSession", "Step", "DeleteSession"}
    assert sent["CreateSession"] == sent["DeleteSession"]  # no session left behind
    assert record["command"].startswith("memserve loadgen step --target")
    assert record["settings"]["concurrency"] == [1, 4] and record["mode"] == "closed"
    assert record["model"]["name"] == "ntm-copy" and record["model"]["input_size"] == 9
    assert record["date"] and record["server_requests_during_run"] == sent

    levels = record["levels"]
    assert [level["level"] for level in levels] == ["C=1", "C=4"]
    for level in levels:
        requests = level["requests"]
        assert requests["errors"] == {} and requests["ok"] == requests["issued"] > 0
        assert level["session_steps"] == 2 * requests["ok"]
        throughput = level["throughput"]
        assert throughput["requests_per_s"] > 0
        assert throughput["session_steps_per_s"] == pytest.approx(2 * throughput["requests_per_s"])
        assert level["span_s"] >= level["window_s"] == pytest.approx(1.0)
        latency = level["latency_ms"]
        assert latency["count"] == requests["ok"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p95"]
        assert latency["p95"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
        assert latency["min"] <= latency["mean"] <= latency["max"]
        # The level's calls include its warm-up and teardown: more than it measured.
        assert level["calls"]["Step"]["OK"] >= requests["ok"]
        server_view = level["server"]
        assert server_view["launches"] > 0
        assert 1 <= server_view["batch_size"]["mean"] <= level["concurrency"]
        assert server_view["queue_wait_ms"]["count"] > 0
    for method in ("CreateSession", "Step", "DeleteSession"):
        assert sum(level["calls"][method]["OK"] for level in levels) == sent[method]["OK"]

    with open(files["csv"], newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["level"] for row in rows] == ["C=1", "C=4"]
    assert [int(row["requests_ok"]) for row in rows] == [
        level["requests"]["ok"] for level in levels
    ]
    assert float(rows[1]["latency_p99_ms"]) == pytest.approx(levels[1]["latency_ms"]["p99"])

    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    image = plt.imread(files["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_open_loop_issues_rate_times_duration(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server_counts(server)
    out = tmp_path / "open.json"
    code = loadgen(server, "step", "--rate", "40", "--duration", "1", "--warmup", "0.25",
                   "--steps", "4", "--json", str(out))  # fmt: skip
    assert code == 0
    assert "R=40" in capsys.readouterr().out
    record = json.loads(out.read_text())
    (level,) = record["levels"]
    assert level["mode"] == "open" and level["rate"] == 40
    assert abs(level["requests"]["issued"] - 40) <= 1
    assert level["requests"]["ok"] == level["requests"]["issued"]
    assert level["open_loop"]["unsent"] == 0
    assert level["open_loop"]["send_lag_ms"]["count"] == level["requests"]["issued"]
    # 10 warm-up requests and 40 measured, in sessions of 4 Step calls.
    assert abs(record["requests_sent"]["Step"]["OK"] - 50) <= 2
    sent = record["requests_sent"]
    assert settled_counts(server, before, sent) == sent


def test_chat_reports_time_to_first_piece_between_pieces_and_tokens(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server_counts(server)
    out = tmp_path / "chat.json"
    code = loadgen(server, "chat", "--model", TINY, "--concurrency", "2", "--duration", "1",
                   "--warmup", "0.2", "--turns", "2", "--max-tokens", "6", "--temperature",
                   "0", "--json", str(out), "--csv", str(tmp_path / "chat.csv"), "--plot",
                   str(tmp_path / "chat.png"))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "ttft p50" in printed and "tok/s" in printed
    record = json.loads(out.read_text())
    (level,) = record["levels"]
    ok = level["requests"]["ok"]
    assert ok > 0 and level["requests"]["errors"] == {}
    assert level["tokens"]["completion"] == 6 * ok  # the tiny VMED never stops early
    assert level["tokens"]["prompt"] > ok
    throughput = level["throughput"]
    assert throughput["requests_per_s"] > 0
    assert throughput["tokens_per_s"] == pytest.approx(6 * throughput["requests_per_s"])
    ttft, itl, latency = level["ttft_ms"], level["itl_ms"], level["latency_ms"]
    assert ttft["count"] == ok and 0 < ttft["p50"] <= latency["max"]
    assert ttft["min"] <= latency["min"]  # the first piece comes before the final message
    assert 0 < itl["count"] <= 5 * ok  # at most 6 pieces a turn: 5 gaps
    assert level["server"]["ttft_ms"]["count"] > 0
    sent = record["requests_sent"]
    assert set(sent) == {"ListModels", "CreateSession", "Generate", "DeleteSession"}
    assert settled_counts(server, before, sent) == sent
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("workload", "method", "extra"),
    [("step", "ModelInfer", ("--steps-per-call", "3")),
     ("chat", "ModelStreamInfer", ("--model", TINY, "--max-tokens", "4"))],
)  # fmt: skip
def test_the_kserve_protocol_drives_the_v2_api_and_the_server_agrees(
    server: ServerProcess, tmp_path: Path, workload: str, method: str, extra: tuple[str, ...]
) -> None:
    """Sessions are v2 sequences: no CreateSession or DeleteSession, every request through
    the v2 API (sequences cut short at the end are ended with one more, counted)."""
    before = server_counts(server)
    out = tmp_path / "kserve.json"
    code = loadgen(server, workload, "--protocol", "kserve", "--concurrency", "3", "--duration",
                   "1", "--warmup", "0.2", "--json", str(out), *extra)  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["settings"]["protocol"] == "kserve"
    (level,) = record["levels"]
    assert level["requests"]["ok"] > 0 and level["requests"]["errors"] == {}
    if workload == "step":
        assert level["session_steps"] == 3 * level["requests"]["ok"]
    else:
        assert level["tokens"]["completion"] == 4 * level["requests"]["ok"]
    sent = record["requests_sent"]
    assert set(sent) == {"ModelMetadata", method} and set(sent[method]) == {"OK"}
    assert settled_counts(server, before, sent) == sent


def test_refused_requests_are_counted_by_status_code(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server_counts(server)
    out = tmp_path / "errors.json"
    too_long = str(MAX_STEPS + 1)  # over the server's --max-steps-per-call
    code = loadgen(server, "step", "--concurrency", "2", "--duration", "0.5", "--warmup", "0",
                   "--steps-per-call", too_long, "--json", str(out))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "INVALID_ARGUMENT" in printed
    record = json.loads(out.read_text())
    (level,) = record["levels"]
    requests = level["requests"]
    assert requests["ok"] == 0 and requests["issued"] > 0
    assert requests["errors"] == {"INVALID_ARGUMENT": requests["issued"]}
    detail = requests["error_details"]["INVALID_ARGUMENT"]  # the server's own words
    assert f"must be between 1 and {MAX_STEPS}, got {MAX_STEPS + 1}" in detail, detail
    assert level["latency_ms"] is None and level["throughput"]["requests_per_s"] == 0
    sent = record["requests_sent"]
    assert "OK" not in sent["Step"]
    assert settled_counts(server, before, sent) == sent


def fake_loadgen(fake: FakeServer, workload: str, out: Path, *args: str) -> dict[str, Any]:
    """`memserve loadgen WORKLOAD` against the stand-in server, one session at a time; its
    JSON."""
    code = main(["loadgen", workload, "--target", fake.target(), "--model", "fake",
                 "--no-metrics", "--no-progress", "--concurrency", "1", "--warmup", "0",
                 "--json", str(out), *args])  # fmt: skip
    assert code == 0
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def test_a_retried_step_is_recorded_once_and_runs_once(tmp_path: Path) -> None:
    """Two attempts of the first Step run and lose their replies (UNAVAILABLE): the third,
    with the same request id, is answered from the server's log. The request counts once
    (OK), the three attempts as calls; every request has an id of its own."""
    fake = FakeServer()
    try:
        fake.service.fail_next("Step", 2, lose_replies=True)
        record = fake_loadgen(fake, "step", tmp_path / "step.json", "--requests", "4",
                              "--steps", "4", "--attempts", "3")  # fmt: skip
        ids = fake.service.ids("Step")
    finally:
        fake.stop()
    (level,) = record["levels"]
    assert level["requests"]["ok"] == level["requests"]["issued"] == 4
    assert level["requests"]["errors"] == {} and level["latency_ms"]["count"] == 4
    assert record["requests_sent"]["Step"] == {"OK": 4, "UNAVAILABLE": 2}
    assert ids[0] == ids[1] == ids[2] and len(set(ids)) == len(ids) - 2 == 4
    assert record["settings"]["attempts"] == 3
    created = fake.service.ids("CreateSession")
    assert len(created) == len(set(created)) and all(created)


def test_without_attempts_a_lost_step_is_an_error(tmp_path: Path) -> None:
    fake = FakeServer()
    try:
        fake.service.fail_next("Step", 1, lose_replies=True)
        record = fake_loadgen(fake, "step", tmp_path / "step.json", "--requests", "2")
    finally:
        fake.stop()
    (level,) = record["levels"]
    assert level["requests"]["errors"] == {"UNAVAILABLE": 1}
    assert record["requests_sent"]["Step"]["UNAVAILABLE"] == 1


def test_a_resumed_reply_is_recorded_once_with_its_pieces_once(tmp_path: Path) -> None:
    """The first turn is cut after two pieces; its retry replies from the start: the turn
    counts once, with four pieces (three gaps), not six."""
    fake = FakeServer()
    try:
        fake.service.cut_replies = [2]
        record = fake_loadgen(fake, "chat", tmp_path / "chat.json", "--requests", "1",
                              "--turns", "1", "--attempts", "2")  # fmt: skip
        ids = fake.service.ids("Generate")
    finally:
        fake.stop()
    (level,) = record["levels"]
    assert level["requests"]["ok"] == 1 and level["requests"]["errors"] == {}
    assert level["ttft_ms"]["count"] == 1 and level["itl_ms"]["count"] == 3
    assert level["tokens"]["completion"] == 4
    assert record["requests_sent"]["Generate"] == {"OK": 1, "UNAVAILABLE": 1}
    assert ids[0] == ids[1]


def test_a_retry_that_replies_otherwise_is_an_invalid_response(tmp_path: Path) -> None:
    fake = FakeServer()
    try:
        fake.service.replies = [["you", " said", ": ", "hi"], ["they", " said", ": ", "hi"]]
        fake.service.cut_replies = [2]
        record = fake_loadgen(fake, "chat", tmp_path / "chat.json", "--requests", "1",
                              "--turns", "1", "--attempts", "2")  # fmt: skip
    finally:
        fake.stop()
    (level,) = record["levels"]
    assert level["requests"]["errors"] == {"INVALID_RESPONSE": 1}
    assert "replied otherwise" in level["requests"]["error_details"]["INVALID_RESPONSE"]


def test_a_delete_whose_reply_was_lost_is_retried_and_the_session_is_gone(
    tmp_path: Path,
) -> None:
    """DeleteSession deletes, then loses its reply (UNAVAILABLE): the retry finds the
    session gone (NOT_FOUND), which is what it asked for. Both attempts are counted, as
    the server counts them; no session is left behind."""
    fake = FakeServer()
    try:
        fake.service.fail_next("DeleteSession", 1, lose_replies=True)
        record = fake_loadgen(fake, "step", tmp_path / "step.json", "--requests", "2",
                              "--steps", "2", "--attempts", "2")  # fmt: skip
        left = dict(fake.service.steps)
    finally:
        fake.stop()
    assert record["requests_sent"]["DeleteSession"] == {"UNAVAILABLE": 1, "NOT_FOUND": 1}
    assert left == {}


def test_the_kserve_protocol_refuses_retries(capsys: pytest.CaptureFixture[str]) -> None:
    """The v2 requests carry no request id, and a repeat of a sequence's last request is
    refused once the sequence has ended: --attempts and --attempt-timeout are refused with
    --protocol kserve (status 2, before anything is sent), and so are retries given to the
    target of a v2 workload directly."""
    for option in (("--attempts", "3"), ("--attempt-timeout", "5")):
        code = main(["loadgen", "step", "--protocol", "kserve", "--target", "127.0.0.1:1",
                     "--no-metrics", *option])  # fmt: skip
        assert code == 2
        error = capsys.readouterr().err
        assert error.startswith("memserve loadgen: error: --attempts and --attempt-timeout")
        assert "sequence_end" in error and "--protocol memserve" in error
    from clients.loadgen.connection import Connection
    from clients.loadgen.kserve import KServeStep
    from clients.loadgen.workloads import GrpcTarget
    from clients.retry import RetryPolicy

    args = build_parser().parse_args(["loadgen", "step", "--protocol", "kserve"])
    settings = loadgen_cli.settings_from(args)
    assert settings.attempts == 1 and settings.protocol == "kserve"
    workload = KServeStep(settings, argparse.Namespace(input_size=9, output_size=9))

    async def target() -> None:
        connection = Connection("127.0.0.1:1", 1, protocol="kserve")
        try:
            with pytest.raises(ValueError, match="--protocol memserve only"):
                GrpcTarget(connection, workload, Recorder("ModelInfer"), 10.0,
                           RetryPolicy(attempts=2))  # fmt: skip
        finally:
            await connection.close()

    asyncio.run(target())


def test_unknown_model_fails_early_with_the_served_models(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server_counts(server)
    assert loadgen(server, "step", "--model", "nope", "--concurrency", "1") == 1
    error = capsys.readouterr().err
    assert "no model 'nope' on the server" in error and "ntm-copy" in error
    assert settled_counts(server, before, {"ListModels": {"OK": 1}}) == {"ListModels": {"OK": 1}}


def test_chat_on_a_model_without_text_fails_early(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadgen(server, "chat", "--model", "ntm-copy") == 1
    assert "does not generate text" in capsys.readouterr().err


def test_unreachable_server_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    port, metrics_port = free_port(), free_port()
    # Its own unused metrics port: the default (9464) may be held by a server on this machine.
    code = main(["loadgen", "step", "--target", f"127.0.0.1:{port}", "--connect-timeout",
                 "0.5", "--metrics-url", f"http://127.0.0.1:{metrics_port}/metrics",
                 "--no-progress"])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err
    assert f"cannot reach a server at 127.0.0.1:{port}" in error
    assert "server metrics: cannot read" in error  # said so, and carried on to the check


def measuring(run: Watched) -> list[tuple[str, float, int]]:
    """The progress lines so far of levels in their window: (level, seconds, requests ok)."""
    return [(level, float(seconds), int(ok))
            for level, seconds, ok in MEASURING.findall(run.text("stderr"))]  # fmt: skip


def test_ctrl_c_ends_the_level_reports_it_and_deletes_its_sessions(
    server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted.json"
    with Watched(
        [sys.executable, "-m", "memserve", "loadgen", "step", "--target", server.target,
         "--metrics-url", server.metrics_url, "--concurrency", "4,8", "--duration", "60",
         "--warmup", "0.2", "--steps", "50", "--json", str(out), "--progress"],
    ) as run:  # fmt: skip
        # Ctrl-C once the first level has measured for a while, with answers in its window.
        run.wait_for(lambda: any(seconds >= 0.5 and ok > 0 for _, seconds, ok in measuring(run)))
        label, seconds, ok = next(line for line in measuring(run) if line[1] >= 0.5 and line[2])
        run.process.send_signal(signal.SIGINT)
        assert run.wait(60) == 130, run.text("stderr")
        stdout, stderr = run.text(), run.text("stderr")
    assert label == "C=4" and "interrupted" in stderr
    assert "C=4" in stdout and "C=8" not in stdout and "(interrupted)" in stdout
    record = json.loads(out.read_text())
    assert record["interrupted"] is True
    (level,) = record["levels"]
    assert level["interrupted"] and level["requests"]["ok"] >= ok > 0
    # The window ran at least as long as the progress line had seen (shown to 0.1 s), and
    # ended at the Ctrl-C, long before its planned 60 s.
    assert seconds - 0.05 <= level["window_s"] < 30
    sent = record["requests_sent"]
    assert sent["CreateSession"]["OK"] == sent["DeleteSession"]["OK"], (sent, stderr)
    samples = server_metrics.scrape(server.metrics_url)
    assert server_metrics.total(samples, "memserve_sessions", model="ntm-copy") == 0


def test_a_second_ctrl_c_quits_at_once(tmp_path: Path) -> None:
    fake = FakeServer()  # a stand-in server that holds the first deletion's reply
    hold = fake.service.hold("DeleteSession")
    out = tmp_path / "never.json"
    try:
        with Watched(
            [sys.executable, "-m", "memserve", "loadgen", "step", "--target", fake.target(),
             "--model", "fake", "--no-metrics", "--concurrency", "2", "--duration", "60",
             "--warmup", "0", "--steps", "2", "--json", str(out), "--progress"],
        ) as run:  # fmt: skip
            hold.wait_entered(60)
            run.process.send_signal(signal.SIGINT)
            run.wait_for(lambda: "interrupted: ending this level" in run.text("stderr"))
            # Past the grace for requests, the level waits on the held deletion.
            run.wait_for(lambda: "cleaning up" in run.text("stderr"))
            run.process.send_signal(signal.SIGINT)
            assert run.wait(60) == 130
            assert not hold.left.is_set()  # it quit while the deletion was still held
            stderr = run.text("stderr")
        assert "memserve loadgen: stopped" in stderr and "Traceback" not in stderr
        assert not out.exists()  # it quit without the report
    finally:
        fake.stop()


# ---------------------------------------------------------------------------- --help


def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def help_entries(text: str) -> dict[str, str]:
    """Each option's help entry (its lines joined), by its first option string."""
    entries: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line.strip()
        elif key is not None and line.startswith("      ") and line.strip():
            entries[key] += " " + line.strip()
        else:
            key = None
    return entries


@pytest.mark.parametrize("workload", ["step", "chat"])
def test_help_lists_every_option_and_the_defaults_a_run_gets(workload: str) -> None:
    parser = subparser(build_parser(), "loadgen", workload)
    text = parser.format_help()
    entries = help_entries(text)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, option
        if action.option_strings:  # no placeholder for a default that is no value
            entry = entries[action.option_strings[0]]
            assert "(default: None)" not in entry and "(default: False)" not in entry
    assert "examples:" in text and f"memserve loadgen {workload}" in text
    # The defaults a run gets, and that the help shows.
    model = "ntm-copy" if workload == "step" else "vmed-chat"
    args = build_parser().parse_args(["loadgen", workload])
    assert args.concurrency == (1, 2, 4, 8, 16, 32, 64, 128, 256) and args.rate is None
    assert (args.warmup, args.duration, args.max_outstanding) == (1.0, 5.0, 256)
    assert args.model == model
    shown = {"--concurrency": "1,2,4,8,16,32,64,128,256", "--warmup": "1.0",
             "--duration": "5.0", "--max-outstanding": "256", "--model": model}  # fmt: skip
    for option, value in shown.items():
        assert f"(default: {value})" in entries[option], entries[option]
    settings = loadgen_cli.settings_from(args)
    assert settings.metrics_url == "http://127.0.0.1:9464/metrics"
    assert settings.mode == "closed" and settings.duration == 5.0


def test_loadgen_help_names_both_workloads() -> None:
    text = subparser(build_parser(), "loadgen").format_help()
    for words in ("step", "chat", "--concurrency", "--rate", "coordinated omission"):
        assert words in text


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["step", "--concurrency", "0"], "integers >= 1"),
        (["step", "--concurrency", "1,,2"], "integers >= 1"),
        (["step", "--rate", "-5"], "rates > 0"),
        (["step", "--rate", "5", "--concurrency", "2"], "not allowed with argument"),
        (["step", "--duration", "2", "--requests", "10"], "not allowed with argument"),
        (["step", "--steps", "0"], "integer >= 1"),
        (["step", "--target", "localhost"], "HOST:PORT"),
        (["chat", "--top-p", "1.5"], "(0, 1]"),
        (["chat", "--stop", ""], "non-empty"),
        ([], "required: WORKLOAD"),
    ],
)
def test_bad_flag_values_are_argparse_errors(
    arguments: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["loadgen", *arguments])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_empty_prompts_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert main(["loadgen", "chat", "--prompts", str(empty)]) == 2
    assert "no utterances" in capsys.readouterr().err


# ---------------------------------------------------------------------------- schedules alone


class SlowTarget:
    """A fake server whose every request takes `seconds`; it remembers what it saw."""

    def __init__(self, seconds: float, close_seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.close_seconds = close_seconds
        self.closed = 0
        self.intended: list[float] = []
        self.sent: list[float] = []
        self.opened = 0
        self.live: set[str] = set()
        self.uses: dict[str, int] = {}

    async def open_session(self) -> Session:
        self.opened += 1
        session = Session(f"s{self.opened}", self.opened)
        self.live.add(session.session_id)
        return session

    async def close_session(self, session: Session) -> None:
        await asyncio.sleep(self.close_seconds)
        self.live.remove(session.session_id)
        self.closed += 1

    async def request(self, session: Session, intended: float) -> Outcome:
        assert session.session_id in self.live
        self.uses[session.session_id] = self.uses.get(session.session_id, 0) + 1
        self.intended.append(intended)
        self.sent.append(now())
        await asyncio.sleep(self.seconds)
        return Outcome(OK, now(), steps=1)


def run_open(target: SlowTarget, plan: Plan, rate: float) -> Recorder:
    async def go() -> Recorder:
        recorder = Recorder("Step")
        await open_loop(target, plan, Level(f"R={rate:g}", recorder, asyncio.Event()), rate)
        return recorder

    return asyncio.run(go())


def test_open_loop_latency_counts_from_the_intended_time() -> None:
    # 20 requests due every 10 ms, each taking 50 ms, one at a time: request i goes out at
    # about 50 i ms, so its latency from its intended time is about 50 + 40 i ms.
    target = SlowTarget(0.05)
    plan = Plan(warmup=0, duration=0.2, requests=None, requests_per_session=3,
                max_outstanding=1, drain_timeout=5)  # fmt: skip
    recorder = run_open(target, plan, rate=100)
    assert recorder.issued == recorder.ok == 20 and recorder.unsent == 0
    gaps = [b - a for a, b in zip(target.intended, target.intended[1:], strict=False)]
    assert gaps == pytest.approx([0.01] * 19)  # the schedule, not the answers, sets them
    waits = [sent - intended for sent, intended in zip(target.sent, target.intended,
                                                      strict=True)]  # fmt: skip
    assert all(wait >= 0.04 * i - 0.002 for i, wait in enumerate(waits))
    assert recorder.capped == 19 and recorder.late >= 18
    latency = recorder.latency.summary()
    assert latency is not None
    assert latency["max"] >= 50 + 40 * 19 - 2  # ms: the last one waited 760 ms to go out
    assert latency["p50"] >= 50 + 40 * 9 - 2
    assert recorder.latency.percentile_ms(0) >= 49  # none is faster than the call itself
    assert not target.live and max(target.uses.values()) <= 3  # K per session, all deleted


def test_open_loop_counts_what_it_could_not_send_before_the_drain_timeout() -> None:
    target = SlowTarget(0.05)
    plan = Plan(warmup=0, duration=0.2, requests=None, requests_per_session=5,
                max_outstanding=1, drain_timeout=0.1)  # fmt: skip
    recorder = run_open(target, plan, rate=100)
    assert recorder.unsent > 0 and recorder.issued + recorder.unsent == 20
    assert recorder.ok == recorder.issued and not target.live


def test_open_loop_opens_no_session_once_it_stops_issuing() -> None:
    # 10 requests 10 ms apart, each 300 ms long, one per session (K = 1): all are still in
    # flight when the last one goes out, and the sessions they retire need no successor.
    target = SlowTarget(0.3)
    plan = Plan(warmup=0, duration=0.1, requests=None, requests_per_session=1)
    recorder = run_open(target, plan, rate=100)
    assert recorder.issued == recorder.ok == 10
    assert target.opened == 10 and not target.live


def test_open_loop_within_its_capacity_sends_on_time() -> None:
    target = SlowTarget(0.005)
    plan = Plan(warmup=0.05, duration=None, requests=30, requests_per_session=4)
    recorder = run_open(target, plan, rate=200)
    assert recorder.issued == recorder.ok == 30 and recorder.capped == 0
    assert len(target.intended) == 30 + 10  # and 10 in the warm-up
    latency = recorder.latency.summary()
    assert latency is not None and latency["min"] >= 5 - 0.1
    assert not target.live


def test_closed_loop_measures_exactly_its_requests_and_closes_every_session() -> None:
    target = SlowTarget(0.01)

    async def go() -> Recorder:
        recorder = Recorder("Step")
        plan = Plan(warmup=0.05, duration=None, requests=15, requests_per_session=4)
        await closed_loop(target, plan, Level("C=3", recorder, asyncio.Event()), 3)
        return recorder

    recorder = asyncio.run(go())
    assert recorder.issued == recorder.ok == 15
    assert recorder.end is not None and recorder.span() > 0
    latency = recorder.latency.summary()
    assert latency is not None and latency["min"] >= 10 - 0.1
    assert not target.live and max(target.uses.values()) <= 4
    assert target.opened >= len(target.intended) / 4


@pytest.mark.parametrize(("request_seconds", "close_seconds"), [(5.0, 0.0), (0.01, 0.4)])
def test_ctrl_c_cancels_requests_in_flight_but_never_a_deletion(
    monkeypatch: pytest.MonkeyPatch, request_seconds: float, close_seconds: float
) -> None:
    """Interrupted in the middle of requests (cancelled after the grace) or of deletions
    (left to finish): either way no session is left open."""
    monkeypatch.setattr(schedule, "INTERRUPT_GRACE", 0.05)
    target = SlowTarget(request_seconds, close_seconds)

    plan = Plan(warmup=0, duration=30, requests=None, requests_per_session=1)
    pressed: list[float] = []  # when Ctrl-C came

    async def go() -> Recorder:
        interrupted = asyncio.Event()
        recorder = Recorder("Step")

        def ctrl_c() -> None:
            pressed.append(now())
            interrupted.set()

        asyncio.get_running_loop().call_later(0.2, ctrl_c)
        await closed_loop(target, plan, Level("C=2", recorder, interrupted), 2)
        return recorder

    recorder = asyncio.run(go())
    assert recorder.interrupted and recorder.end is not None and plan.duration is not None
    # The window ended at the Ctrl-C (or as late as a loaded machine noticed it), not at its
    # planned end.
    assert pressed[0] <= recorder.end < recorder.start + plan.duration
    assert not target.live and target.closed == target.opened >= 2
    if request_seconds > 1:
        assert recorder.cancelled == recorder.issued == 2 and recorder.errors == {}


class InterruptingTarget(SlowTarget):
    """A SlowTarget whose first request is a Ctrl-C: it comes in the warm-up, whatever the
    machine's speed, since the first request is made at once."""

    def __init__(self, seconds: float, interrupted: asyncio.Event) -> None:
        super().__init__(seconds)
        self.interrupted = interrupted

    async def request(self, session: Session, intended: float) -> Outcome:
        self.interrupted.set()
        return await super().request(session, intended)


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_ctrl_c_in_the_warm_up_leaves_an_empty_window(loop: str) -> None:
    interrupted = asyncio.Event()
    target = InterruptingTarget(0.01, interrupted)

    async def go() -> Recorder:
        recorder = Recorder("Step")
        level = Level("L", recorder, interrupted)
        plan = Plan(warmup=2, duration=2, requests=None, requests_per_session=3)
        if loop == "closed":
            await closed_loop(target, plan, level, 2)
        else:
            await open_loop(target, plan, level, 50)
        assert level.closed.is_set() and not level.opened.is_set()
        return recorder

    recorder = asyncio.run(go())
    assert recorder.interrupted and recorder.issued == 0 and recorder.unsent == 0
    assert recorder.span() == 0 and recorder.summary()["throughput"]["requests_per_s"] == 0
    assert len(target.intended) > 0 and not target.live  # the warm-up ran, then was cleared


class FullTarget(SlowTarget):
    """A fake server that refuses every new session."""

    async def open_session(self) -> Session:
        raise SessionRefused("RESOURCE_EXHAUSTED", "no slot")


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_a_request_without_a_session_fails_with_the_create_code(loop: str) -> None:
    target = FullTarget(0.01)

    async def go() -> Recorder:
        recorder = Recorder("Step")
        level = Level("L", recorder, asyncio.Event())
        plan = Plan(warmup=0, duration=None, requests=5, requests_per_session=3)
        if loop == "closed":
            await closed_loop(target, plan, level, 2)
        else:
            await open_loop(target, plan, level, 100)
        return recorder

    recorder = asyncio.run(go())  # ends: a refused session uses up a measured request
    assert recorder.issued == 5 and recorder.ok == 0
    assert recorder.errors == {"RESOURCE_EXHAUSTED": 5}
    assert recorder.error_details == {"RESOURCE_EXHAUSTED": "no slot"}


def test_throughput_counts_the_answers_that_arrive_in_the_window() -> None:
    """Throughput: the OK answers that arrive inside [start, end], whenever their request
    started, over the window's length. Latency: the requests that started in the window."""
    recorder = Recorder("Step")
    recorder.start, recorder.end = 10.0, 20.0

    def answer(code: str, done: float, intended: float | None = None) -> None:
        outcome = Outcome(code, done, steps=2)
        recorder.finished(outcome, done - 0.5 if intended is None else intended)
        if intended is not None:  # a measured request
            recorder.sent()
            recorder.record(outcome, intended)

    answer(OK, 9.9)  # a warm-up request answered before the window: not counted
    answer(OK, 10.0)  # two warm-up requests answered in it: counted
    answer(OK, 10.4)
    for i in range(5):
        answer(OK, 11.0 + i, intended=10.5 + i)  # measured, answered in the window
    answer(OK, 20.5, intended=19.9)  # measured, answered after it: a latency, not throughput
    answer("DEADLINE_EXCEEDED", 80.0, intended=19.0)  # a late error changes neither
    summary = recorder.summary()
    assert summary["throughput"]["requests_per_s"] == pytest.approx(7 / 10)
    assert summary["throughput"]["session_steps_per_s"] == pytest.approx(14 / 10)
    requests = summary["requests"]
    assert (requests["answered_in_window"], requests["ok"], requests["issued"]) == (7, 6, 7)
    assert requests["errors"] == {"DEADLINE_EXCEEDED": 1}
    assert summary["latency_ms"]["count"] == 6
    assert summary["latency_ms"]["max"] == pytest.approx(600, rel=1e-3)  # 20.5 - 19.9 s
    assert summary["window_s"] == 10 and summary["span_s"] == 70  # span: information only

    chat = Recorder("Generate")
    chat.start, chat.end = 0.0, 2.0
    for done in (0.5, 1.0, 2.5):
        chat.finished(Outcome(OK, done, completion_tokens=8), done - 0.25)
    assert chat.summary()["throughput"] == {"requests_per_s": 1.0, "tokens_per_s": 8.0}


def test_the_answers_in_the_window_as_the_benchmarks_read_them() -> None:
    """What arrived inside the window, whenever its request started: the latency of the OK
    answers, each text piece (the first as time to first piece, the others as the gap
    since the one before), finish reasons, tokens, and the failures that came then."""
    recorder = Recorder("Generate")
    recorder.start, recorder.end = 10.0, 20.0

    def reply(started: float, pieces: list[float], done: float) -> None:
        outcome = Outcome(OK, done, pieces=pieces, completion_tokens=len(pieces),
                          prompt_tokens=3, finish_reason="length")  # fmt: skip
        recorder.finished(outcome, started)

    reply(9.0, [9.5, 10.5, 11.0], 11.5)  # started before: its latency, two pieces inside
    reply(12.0, [12.5, 13.0], 13.25)  # all inside
    reply(19.0, [19.5, 20.5], 21.0)  # answered after: its inside piece counts, not it
    recorder.finished(Outcome("UNAVAILABLE", 15.0), 14.0)
    recorder.finished(Outcome("UNAVAILABLE", 25.0), 14.0)  # after the window: not counted
    assert (recorder.answered, recorder.answered_tokens, recorder.answered_prompt_tokens) == (
        2, 5, 6,
    )  # fmt: skip
    assert recorder.finish_reasons == {"length": 2}
    assert recorder.window_errors == {"UNAVAILABLE": 1}
    latency = recorder.answer_latency.microseconds()
    assert recorder.answer_latency.count == 2 and latency["max"] == pytest.approx(2.5e6, 1e-3)
    assert recorder.answer_ttft.count == 2  # 12.5 - 12.0 and 19.5 - 19.0
    assert recorder.answer_ttft.microseconds()["max"] == pytest.approx(0.5e6, 1e-3)
    assert recorder.answer_itl.count == 3  # 10.5 - 9.5, 11.0 - 10.5, 13.0 - 12.5
    assert recorder.answer_itl.microseconds()["max"] == pytest.approx(1e6, 1e-3)


def test_the_server_must_count_exactly_the_calls_sent() -> None:
    sent = {"CreateSession": {"OK": 2}, "Step": {"OK": 6}, "DeleteSession": {"OK": 2}}

    def verdict(counted: dict[str, dict[str, int]]) -> str:
        document = {"requests_sent": sent, "server_requests_during_run": counted}
        return report.notes([], document)[-1]

    assert verdict(dict(sent)) == "the server counted the same calls over the run"
    for other in (
        {**sent, "GetSession": {"OK": 1}},  # a call the run never made
        {**sent, "Step": {"OK": 6, "CANCELLED": 1}},
        {"CreateSession": {"OK": 2}, "Step": {"OK": 6}},  # one it made, not counted
    ):
        assert verdict(other).startswith("the server counted other calls"), other


class DrawingTarget(SlowTarget):
    """A SlowTarget that draws the progress line as each request starts: some start in the
    window, whatever the machine's speed, where a redraw on a timer might not come."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.level: Level | None = None
        self.lines: list[str] = []

    async def request(self, session: Session, intended: float) -> Outcome:
        assert self.level is not None
        self.lines.append(Progress.line(self.level, 0.3, 0.6, None))
        return await super().request(session, intended)


def test_progress_line_follows_the_level() -> None:
    stream = io.StringIO()
    target = DrawingTarget(0.01)

    async def go() -> None:
        recorder = Recorder("Step")
        level = target.level = Level("C=2", recorder, asyncio.Event())
        progress = Progress(True, stream)
        progress.start(level, 0.3, 0.6, None)
        await closed_loop(target, Plan(0.3, 0.6, None, 3), level, 2)
        await progress.stop()

    asyncio.run(go())
    lines = stream.getvalue().split("\r\033[K")
    # Drawn at once, in the warm-up; erased at the end.
    assert "C=2 warm-up" in lines[1] and "/0.3 s" in lines[1] and lines[-1] == ""
    assert any("C=2 warm-up" in line and "/0.3 s" in line for line in target.lines)
    assert any("measuring" in line and " ok " in line and "0 errors" in line
               for line in target.lines)  # fmt: skip


def test_server_metrics_over_a_window_from_the_text_format() -> None:
    def page(launches: int, sessions: int, wait: float, slow: int, steps: int) -> str:
        return "\n".join([
            "# HELP memserve_batch_size Sessions stepped by one launch",
            "# TYPE memserve_batch_size histogram",
            f'memserve_batch_size_bucket{{le="1.0",model="ntm-copy"}} {launches // 2}',
            f'memserve_batch_size_bucket{{le="+Inf",model="ntm-copy"}} {launches}',
            f'memserve_batch_size_count{{model="ntm-copy"}} {launches}',
            f'memserve_batch_size_sum{{model="ntm-copy"}} {sessions}',
            f'memserve_batch_size_count{{model="other"}} {launches * 7}',
            f'memserve_queue_wait_seconds_bucket{{le="0.0001",model="ntm-copy"}} {steps - slow}',
            f'memserve_queue_wait_seconds_bucket{{le="0.0002",model="ntm-copy"}} {steps}',
            f'memserve_queue_wait_seconds_bucket{{le="+Inf",model="ntm-copy"}} {steps}',
            f'memserve_queue_wait_seconds_count{{model="ntm-copy"}} {steps}',
            f'memserve_queue_wait_seconds_sum{{model="ntm-copy"}} {wait}',
            f'memserve_request_duration_seconds_count{{code="OK",method="Step"}} {steps}',
            'memserve_build_info{python="3.11",version="0.1 \\"x\\", y"} 1.0',
        ])  # fmt: skip

    before = server_metrics.parse(page(100, 150, 0.01, 0, 1000))
    after = server_metrics.parse(page(300, 550, 0.03, 50, 1400))
    assert ("memserve_build_info", (("python", "3.11"), ("version", '0.1 "x", y'))) in before
    summary = server_metrics.summarize(before, after, "ntm-copy", 2.0, "step")
    assert summary["launches"] == 200 and summary["batch_size"]["mean"] == pytest.approx(2.0)
    assert summary["batch_size"]["p99_upper_bound"] is None  # in the +Inf bucket
    wait = summary["queue_wait_ms"]
    assert wait["count"] == 400 and wait["mean"] == pytest.approx(0.05)  # 0.02 s / 400
    assert wait["p99_upper_bound"] == pytest.approx(0.2)  # 50 of 400 over 0.1 ms
    assert summary["requests"] == {"Step": {"OK": 400}}
    assert summary["step_duration_ms"] is None and "ttft_ms" not in summary


def test_help_examples_parse() -> None:
    """Every example in the help is a command line the parser accepts."""
    parser = build_parser()
    texts = [subparser(parser, "loadgen", *names).format_help() for names in
             ((), ("step",), ("chat",))]  # fmt: skip
    examples = [line.split("#")[0].split() for text in texts for line in text.splitlines()
                if line.strip().startswith("memserve loadgen")]  # fmt: skip
    assert len(examples) >= 10
    for words in examples:
        parsed: Any = parser.parse_args(words[1:])
        assert parsed.handler is not None

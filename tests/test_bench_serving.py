"""bench/serving.py stays runnable: a tiny run against a real server and the echo server
writes a consistent JSON record. Speed is not asserted (GUIDE: timing targets live in
benchmarks, never in timed tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serving as bench
from tests.served import CPU_STEP

SHAPES = {"unary_t1": ("Step", 1), "stream_t1": ("StepStream", 1), "unary_t20": ("Step", 20)}


@pytest.mark.timeout(240)
def test_tiny_run_writes_a_consistent_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serving.json"
    argv = ["--rounds", "2", "--levels", "1", "2", "--batches", "1", "2", "--seconds", "0.3",
            "--warmup", "0.2", "--step-seconds", "0.05", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "targets" in printed and "unary_t20 at C=2 / in-process B=2" in printed
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/serving.py " + " ".join(argv)
    assert record["cores"] >= 1 and record["device"]
    assert set(record["versions"]) >= {"python", "torch", "grpcio"}
    assert record["model"]["input_size"] == 9 and record["model"]["output_size"] == 8
    settings = record["settings"]
    assert settings["levels"] == [1, 2] and settings["seconds"] == 0.3 and settings["rounds"] == 2

    in_process = {(row["round"], row["batch"]): row for row in record["in_process"]}
    assert sorted(in_process) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for (_, batch), row in in_process.items():
        assert row["samples"] >= 5 and row["seconds_per_step"] > 0
        assert row["session_steps_per_s"] == pytest.approx(batch / row["seconds_per_step"])
        assert row["backend"] == CPU_STEP

    levels = {(r["round"], r["target"], r["shape"], r["concurrency"]): r for r in record["levels"]}
    assert sorted(levels) == sorted(
        (n, target, shape, c)
        for n in (1, 2)
        for target in ("echo", "server")
        for shape in SHAPES
        for c in (1, 2)
    )
    for (_, target, shape, _), row in levels.items():
        assert (row["method"], row["steps_per_call"]) == SHAPES[shape]
        assert row["errors"] == {} and row["ok"], row
        assert row["calls"] > 0
        assert row["seconds"] == pytest.approx(0.3)
        steps = row["steps_per_call"]
        assert row["session_steps"] == row["calls"] * steps
        assert row["calls_per_s"] == pytest.approx(row["calls"] / row["seconds"])
        assert row["session_steps_per_s"] == pytest.approx(row["calls"] * steps / row["seconds"])
        latency = row["latency_us"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert row["server_cpu_seconds"] > 0
        # The host's share of the machine's time, from a counter that only grows. (No upper
        # bound: a hypervisor may credit a long steal at once, beyond a short window.)
        assert row["stolen_cpu_seconds"] >= 0
        if target == "server":  # its own metrics: every launch steps 1 or 2 sessions
            batching = row["batching"]
            assert batching["launches"] > 0
            assert 1 <= batching["mean_batch_size"] <= 2
            # What stepped each model, as the server said; MEMSERVE_KERNEL_BACKEND=torch
            # leaves the fused C step in place where a compiler builds it.
            assert row["backends"]["ntm-copy"] == CPU_STEP
        else:
            assert row["batching"] is None and row["backends"] == {}

    def rate(n: int, target: str, shape: str, concurrency: int) -> float:
        return float(levels[(n, target, shape, concurrency)]["session_steps_per_s"])

    # Each round's targets come from that round's numbers only.
    assert len(record["rounds"]) == 2
    for n, targets in enumerate(record["rounds"], start=1):
        for shape in ("unary_t1", "stream_t1"):
            echo = targets["t1_vs_echo"][shape]
            for level in echo["per_level"]:
                c = level["concurrency"]
                assert level["ratio"] == pytest.approx(
                    rate(n, "server", shape, c) / rate(n, "echo", shape, c)
                )
            best, echo_best = echo["server_best_concurrency"], echo["echo_best_concurrency"]
            assert rate(n, "server", shape, best) == max(
                rate(n, "server", shape, c) for c in (1, 2)
            )
            assert echo["server_best_over_echo_best"] == pytest.approx(
                rate(n, "server", shape, best) / rate(n, "echo", shape, echo_best)
            )
        t20 = targets["t20_vs_in_process"]
        assert (t20["concurrency"], t20["batch"]) == (2, 2)
        assert t20["ratio"] == pytest.approx(
            rate(n, "server", "unary_t20", 2) / in_process[(n, 2)]["session_steps_per_s"]
        )
        for shape in SHAPES:
            scaling = targets["scaling"][shape]
            assert scaling["ratio"] == pytest.approx(
                rate(n, "server", shape, 2) / rate(n, "server", shape, 1)
            )

    # The verdicts: the median over the rounds against the threshold.
    verdicts = record["targets"]
    decided = [
        (verdicts["t1_vs_echo"][shape], 0.7, [r["t1_vs_echo"][shape]["server_best_over_echo_best"]
                                             for r in record["rounds"]])
        for shape in ("unary_t1", "stream_t1")
    ] + [
        (verdicts["t20_vs_in_process"], 0.5,
         [r["t20_vs_in_process"]["ratio"] for r in record["rounds"]]),
    ] + [
        (verdicts["scaling"][shape], 10, [r["scaling"][shape]["ratio"] for r in record["rounds"]])
        for shape in SHAPES
    ]  # fmt: skip
    for verdict, threshold, ratios in decided:
        assert verdict["rounds"] == pytest.approx(ratios)
        assert verdict["median"] == pytest.approx(sum(ratios) / 2)  # the median of two
        assert verdict["threshold"] == threshold
        assert verdict["pass"] == (verdict["median"] >= threshold)

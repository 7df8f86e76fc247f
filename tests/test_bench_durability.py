"""bench/durability.py stays runnable: a tiny run (one round, short windows, a few sessions to
recover) against real servers on real stores writes a consistent JSON record. Speed is not
asserted (GUIDE: timing targets live in benchmarks, never in timed tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import durability as bench
from bench.durability_commits import APPEND_SIZES
from bench.durability_flush import FLUSH_RATES, flushing
from bench.durability_recovery import recovery_verdict
from tests.served import CPU_STEP

CONFIGS = ["memory", "dir-launch", "dir-interval", "redis-launch", "redis-interval"]
SHAPES = {"unary_t1": (1, 2), "unary_t20": (20, 4)}  # steps per call, C
SESSIONS, CALLS = 24, 2


@pytest.mark.timeout(600)
def test_tiny_run_writes_a_consistent_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "durability.json"
    argv = ["--rounds", "1", "--seconds", "0.5", "--warmup", "0.2", "--concurrency", "2", "4",
            "--level-ttl", "1", "--sessions", str(SESSIONS), "--calls-per-session", str(CALLS),
            "--recovery-concurrency", "4", "--commit-seconds", "0.01", "--store-dir",
            str(tmp_path), "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "targets" in printed and "recovery dir" in printed and "recovery redis" in printed
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/durability.py " + " ".join(argv)
    assert record["cores"] >= 1 and record["device"]
    assert set(record["versions"]) >= {"python", "torch", "grpcio"}
    assert record["store_filesystem"]["path"] == str(tmp_path)
    settings = record["settings"]
    assert settings["rounds"] == 1 and settings["seconds"] == 0.5
    assert settings["concurrency"] == [2, 4] and settings["level_ttl"] == 1

    # Throughput: every (store, shape) once, measured by bench/serving.py's level.
    levels = {(r["round"], r["config"], r["shape"]): r for r in record["levels"]}
    assert sorted(levels) == sorted((1, c, s) for c in CONFIGS for s in SHAPES)
    for (_, config, shape), row in levels.items():
        steps, concurrency = SHAPES[shape]
        assert row["method"] == "Step"
        assert (row["steps_per_call"], row["concurrency"]) == (steps, concurrency)
        assert row["target"] == config and row["store"] == config.split("-")[0]
        assert row["durability"] == (config.split("-")[1] if "-" in config else "none")
        assert row["errors"] == {} and row["ok"] and row["calls"] > 0, row
        assert row["seconds"] == pytest.approx(0.5)
        assert row["session_steps"] == row["calls"] * steps
        assert row["session_steps_per_s"] == pytest.approx(row["calls"] * steps / row["seconds"])
        latency = row["latency_us"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert row["batching"]["launches"] > 0
        assert row["backends"]["ntm-copy"] == CPU_STEP
        assert row["store_cpu_seconds"] >= 0 and row["disk_write_bytes"] >= 0
        assert row["other_servers_sessions"] == 0  # every other server was quiet
        if config == "redis-launch":  # every acknowledged call went through a commit script
            assert row["redis_commits"] > 0 and row["redis_commit_mean_us"] > 0
        if not config.startswith("redis"):
            assert row["redis_commits"] == 0 and row["store_cpu_seconds"] == 0

    def rate(config: str, shape: str) -> float:
        return float(levels[(1, config, shape)]["session_steps_per_s"])

    # Ratios to memory's in the same round; the targets decided on their median (of one).
    [ratios] = record["ratios"]
    for config in CONFIGS:
        for shape in SHAPES:
            assert ratios[config][shape] == pytest.approx(rate(config, shape) /
                                                          rate("memory", shape))  # fmt: skip
    throughput = record["targets"]["throughput"]
    assert set(throughput) == {"dir-launch", "redis-launch"}
    for config, threshold in (("dir-launch", 0.85), ("redis-launch", 0.7)):
        target = throughput[config]
        assert target["threshold"] == threshold
        for shape, decided in target["shapes"].items():
            assert decided["rounds"] == pytest.approx([ratios[config][shape]])
            assert decided["median"] == pytest.approx(ratios[config][shape])
            assert decided["pass"] == (decided["median"] >= threshold)
        assert target["pass"] == all(d["pass"] for d in target["shapes"].values())

    # What a commit costs, and what a step logs.
    costs = record["commit_costs"]
    assert [row["bytes"] for row in costs["appends"]] == list(APPEND_SIZES)
    assert [row["bytes"] for row in costs["writes_into_zeros"]] == list(APPEND_SIZES)
    launches = ["one_call_t1", "unary_t1", "unary_t20"]
    for rows in (costs["dir_commit"], costs["redis"]["always"]["commit"],
                 costs["redis"]["no"]["commit"]):  # fmt: skip
        assert [row["launch"] for row in rows] == launches
        assert [row["sessions"] for row in rows] == [1, 64, 256]  # the full run's launches
        assert rows[0]["bytes"] < rows[1]["bytes"] < rows[2]["bytes"]
    for row in [*costs["appends"], *costs["writes_into_zeros"], *costs["dir_commit"]]:
        assert row["samples"] >= 10 and 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
    assert [row["model"] for row in record["record_bytes"]] == ["ntm-copy", "dnc-recall",
                                                                "vmed-chat"]  # fmt: skip
    for row in record["record_bytes"]:
        assert row["snapshot_record_bytes"] > row["state_bytes"]
        assert all(0 < size < row["snapshot_record_bytes"]
                   for size in row["step_record_bytes"].values())  # fmt: skip
        assert row["bytes_per_step_in_a_call_of_20"] < min(row["step_record_bytes"].values())

    # Recovery: every session known after the restart, each first call right.
    assert [result["store"] for result in record["recovery"]] == ["dir", "redis"]
    for result in record["recovery"]:
        assert result["sessions"] == SESSIONS and result["adopted"] == SESSIONS
        assert result["fill"]["calls"] == SESSIONS * CALLS and result["fill"]["errors"] == {}
        for calls in (result["first_calls"], result["second_calls"]):
            assert calls["calls"] == SESSIONS and calls["errors"] == {}
            assert calls["wrong_step"] == 0
        restart = result["restart"]
        assert 0 < restart["to_model_loaded_s"] <= restart["to_store_opened_s"]
        assert restart["to_store_opened_s"] <= restart["to_serving_s"]
        assert result["open_in_process"]["sessions"] == SESSIONS
        assert result["store_bytes"] > 0
    # What another process's flushes cost memory's server: each rate once, against none.
    flush = record["flush"]
    assert flush["rates"] == list(FLUSH_RATES) and flush["shape"] == "unary_t1"
    by_rate = {level["flusher"]["rate"]: level for level in flush["levels"]}
    assert sorted(by_rate) == sorted(FLUSH_RATES) and len(flush["levels"]) == len(FLUSH_RATES)
    for flush_rate, level in by_rate.items():
        assert level["round"] == 1 and level["concurrency"] == 2 and level["steps_per_call"] == 1
        assert level["errors"] == {} and level["calls"] > 0, level
        if flush_rate:  # the flushing process ran beside the level and made fdatasyncs
            flusher = level["flusher"]
            assert flusher["fdatasyncs"] > 0 and flusher["achieved_per_s"] > 0
            assert 0 < flusher["fdatasync"]["p50_us"] <= flusher["fdatasync"]["max_us"]
        else:
            assert "fdatasyncs" not in level["flusher"]
    [flush_ratios] = flush["ratios"]
    for flush_rate in FLUSH_RATES:
        steps = by_rate[flush_rate]["session_steps_per_s"]
        expected = steps / by_rate[0]["session_steps_per_s"]
        assert flush_ratios[str(flush_rate)] == pytest.approx(expected)
        assert flush["median_ratio"][str(flush_rate)] == pytest.approx(expected)
    assert "flush: memory's server" in printed

    recovery = record["targets"]["recovery"]
    assert recovery["judged_on"] == "to_serving_s" and recovery["threshold_s"] == 10.0
    for kind, decided in recovery["stores"].items():
        [result] = [r for r in record["recovery"] if r["store"] == kind]
        assert decided["to_serving_s"] == result["restart"]["to_serving_s"]
        restart = result["restart"]
        assert decided["adopt_s"] == pytest.approx(
            restart["to_serving_s"] - restart["to_model_loaded_s"]
        )
        assert decided["adopt_s"] >= 0 and decided["store_open_s"] > 0
        assert decided["all_sessions_known"] and decided["first_calls_correct"]
        assert decided["pass"] == (decided["to_serving_s"] < 10.0)
    assert recovery["pass"] == all(d["pass"] for d in recovery["stores"].values())


def test_a_recovery_that_lost_state_fails_however_fast() -> None:
    """The recovery target is judged on the restart's time, and only a server that came back
    whole passes: every session known, each first call answered at the right step."""

    def result(store: str, adopted: int, wrong_step: int, errors: dict[str, int]) -> dict[str, Any]:
        calls = {"calls": 10, "seconds": 0.5, "errors": errors, "wrong_step": wrong_step,
                 "stalled": False}  # fmt: skip
        return {"store": store, "sessions": 10, "adopted": adopted, "first_calls": calls,
                "restart": {"to_serving_s": 3.0, "to_model_loaded_s": 2.9},
                "start_empty": {"to_serving_s": 2.5},
                "open_in_process": {"open_s": 0.25, "list_s": 0.05}}  # fmt: skip

    whole = recovery_verdict([result("dir", 10, 0, {})])
    decided = whole["stores"]["dir"]
    assert whole["pass"] and decided["store_open_s"] == pytest.approx(0.3)
    assert decided["adopt_s"] == pytest.approx(0.1)
    assert decided["over_empty_start_s"] == pytest.approx(0.5)
    for lost in (result("dir", 9, 0, {}), result("dir", 10, 3, {}),
                 result("dir", 10, 0, {"NOT_FOUND": 1})):  # fmt: skip
        assert not recovery_verdict([lost])["pass"]


def test_a_flushing_process_that_cannot_write_fails_the_part_at_once(tmp_path: Path) -> None:
    """The flush part's process appends to a file under --store-dir: where it cannot, the
    part stops with that reason (its exit code, the path) instead of measuring no flushes."""
    missing = tmp_path / "missing"
    with pytest.raises(RuntimeError, match=r"did not start.*missing"), flushing(missing, 100):
        pass

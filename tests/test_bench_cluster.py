"""bench/cluster.py stays runnable: a tiny run (a lone server, one cluster scaled from 1 to
2 replicas, one kill) writes a consistent JSON record. Speed is not asserted (timing
targets live in benchmarks, never in timed tests); the ratios must be the run's own
numbers, and the kill must have paused some session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cluster as bench
from bench.child_server import ROOT


def test_help_describes_the_run() -> None:
    done = subprocess.run([sys.executable, "bench/cluster.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "failover" in done.stdout and "--kills" in done.stdout


@pytest.mark.timeout(400)
def test_tiny_run_writes_a_consistent_record(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    argv = ["--rounds", "2", "--seconds", "0.5", "--warmup", "0.2", "--concurrency", "2",
            "--replicas", "1", "2", "--kills", "1", "--seed", "7", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/cluster.py " + " ".join(argv)
    assert record["device"] and record["cores"] and record["settings"]["seed"] == 7
    results, ratios = record["results"], record["ratios"]
    assert set(results) == {"lone", "direct", "envoy-1", "envoy-2", "failover"}
    rate = {name: r["steps_per_s"] for name, r in results.items() if name != "failover"}
    for name, steps in rate.items():
        assert steps > 0 and results[name]["p50_ms"] <= results[name]["p99_ms"], name
    rounds = record["rounds"]
    assert len(rounds) == 2 and all(set(r) == {"lone", "direct", "envoy-1"} for r in rounds)
    for name in ("lone", "direct", "envoy-1"):  # the lower median of two: the slower round
        assert results[name] == min((r[name] for r in rounds), key=lambda m: m["steps_per_s"])

    def median_ratio(a: str, b: str) -> float:
        return float(sum(r[a]["steps_per_s"] / r[b]["steps_per_s"] for r in rounds) / 2)

    assert ratios["direct_vs_lone"] == pytest.approx(median_ratio("direct", "lone"), abs=1e-3)
    assert ratios["envoy_1_vs_direct"] == pytest.approx(median_ratio("envoy-1", "direct"), abs=1e-3)
    assert ratios["envoy_2_vs_envoy_1"] == pytest.approx(
        rate["envoy-2"] / rate["envoy-1"], abs=1e-3
    )
    failover = results["failover"]
    assert failover["kills"] == 1 and failover["sessions_paused"] >= 1
    assert 0 < failover["p50_ms"] <= failover["p99_ms"]

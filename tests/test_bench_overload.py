"""bench/overload.py stays runnable: a tiny run against its five real servers writes a
consistent JSON record. Speed is not asserted (GUIDE: timing targets live in benchmarks,
never in timed tests); what is asserted is that the overload was real (calls refused with
RESOURCE_EXHAUSTED, none at the bound) and that the ratios are the round's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import overload as bench


@pytest.mark.timeout(300)
def test_tiny_run_writes_a_consistent_record(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    argv = ["--rounds", "1", "--bound", "4", "--factor", "10", "--concurrency", "2",
            "--seconds", "1", "--warmup", "0.2", "--channels", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/overload.py " + " ".join(argv)
    assert record["device"] and set(record["versions"]) >= {"python", "torch", "grpcio"}
    (round_,) = record["rounds"]
    at_bound, overloaded = round_["at_bound"], round_["overloaded"]
    assert (at_bound["tasks"], overloaded["tasks"]) == (4, 40)
    assert set(at_bound["codes"]) == {"OK"}  # at the bound every call is admitted
    assert set(overloaded["codes"]) == {"OK", "RESOURCE_EXHAUSTED"}
    assert overloaded["refused_p50_ms"] <= overloaded["refused_p99_ms"]
    assert round_["goodput"] == pytest.approx(
        overloaded["steps_per_s"] / at_bound["steps_per_s"], abs=1e-3
    )
    for name in bench.SECURITY:
        assert set(round_[name]["codes"]) == {"OK"}, name  # the key and the CA were right
        assert round_[name]["steps_per_s"] > 0
    for name in bench.SECURITY[1:]:
        ratio = round_[f"{name}_vs_plaintext"]
        assert ratio == pytest.approx(
            round_[name]["steps_per_s"] / round_["plaintext"]["steps_per_s"], abs=1e-3
        )
        assert record["targets"][f"{name}_vs_plaintext"] == ratio  # the median of one
    assert record["targets"]["goodput"]["median"] == round_["goodput"]

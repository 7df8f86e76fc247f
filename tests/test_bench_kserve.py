"""bench/kserve.py stays runnable: a tiny run against a real server writes a consistent
record of v1 and v2 levels and their ratios. Speed is not asserted (GUIDE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kserve as bench
from tests.served import CPU_STEP


@pytest.mark.timeout(240)
def test_tiny_run_writes_v1_and_v2_levels_and_their_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kserve.json"
    argv = ["--rounds", "2", "--levels", "1", "2", "--seconds", "0.3", "--warmup", "0.2",
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    assert "v2/v1" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/kserve.py " + " ".join(argv)
    assert record["device"] and set(record["versions"]) >= {"python", "grpcio", "protobuf"}
    levels = {(r["round"], r["target"], r["shape"], r["concurrency"]): r for r in record["levels"]}
    assert len(levels) == 2 * 2 * 2 * 2
    for (_, target, shape, _), row in levels.items():
        assert row["ok"] and row["calls"] > 0, row
        method = {
            ("v1", "unary_t1"): "Step",
            ("v1", "stream_t1"): "StepStream",
            ("v2", "unary_t1"): "ModelInfer",
            ("v2", "stream_t1"): "ModelStreamInfer",
        }
        assert row["method"] == method[target, shape]  # fmt: skip
        assert row["backends"]["ntm-copy"] == CPU_STEP
    ratios = record["ratios"]
    assert set(ratios) == {"unary C=1", "unary C=2", "stream C=1", "stream C=2"}
    for ratio in ratios.values():
        assert len(ratio["rounds"]) == 2 and ratio["median"] > 0 and ratio["threshold"] == 0.85

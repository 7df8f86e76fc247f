"""bench/kernels.py stays runnable: a tiny CPU run writes a consistent JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import kernels as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only mode")
def test_cpu_run_writes_a_consistent_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    argv = ["--batch", "1", "3", "--rows", "10", "--width", "4", "--dtype", "float32",
            "--cpu-budget", "0.05", "--out", str(out)]  # fmt: skip
    code = bench.main(argv)
    assert code == 0
    printed = capsys.readouterr().out
    assert "No CUDA device" in printed
    record = json.loads(out.read_text())
    assert record["device_type"] == "cpu" and record["implementations"] == ["eager"]
    assert record["command"] == "python bench/kernels.py " + " ".join(argv)
    assert [(row["batch"], row["rows"], row["width"]) for row in record["rows"]] == [
        (1, 10, 4),
        (3, 10, 4),
    ]
    for row in record["rows"]:
        # GB/s is the minimum bytes over the measured time.
        seconds = row["microseconds"]["eager"] / 1e6
        assert row["gbps"]["eager"] == pytest.approx(row["min_bytes"] / seconds / 1e9)
        # Each addressed slot's memory (10 x 4) and two weightings (2 x 10) read and written.
        assert row["min_bytes"] >= row["batch"] * 2 * (40 + 20) * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: fused timing is allowed")
def test_fused_timing_is_refused_without_cuda() -> None:
    with pytest.raises(SystemExit, match="need CUDA"):
        bench.main(["--impl", "fused", "--batch", "1", "--rows", "4", "--width", "2"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only mode")
def test_cpu_dnc_run_counts_the_link_matrix(tmp_path: Path) -> None:
    out = tmp_path / "dnc.json"
    argv = ["--kernel", "dnc", "--batch", "2", "--rows", "12", "--width", "5", "--dtype",
            "float32", "--cpu-budget", "0.05", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "dnc_memory_step" and record["heads"]["read"] == 4
    (row,) = record["rows"]
    assert (row["batch"], row["rows"], row["width"]) == (2, 12, 5)
    # Each slot's link (12 x 12) and memory (12 x 5) read and written, at the least.
    assert row["min_bytes"] >= 2 * 2 * (144 + 60) * 4
    seconds = row["microseconds"]["eager"] / 1e6
    assert row["gbps"]["eager"] == pytest.approx(row["min_bytes"] / seconds / 1e9)

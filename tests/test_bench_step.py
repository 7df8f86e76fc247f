"""bench/step.py stays runnable: a tiny run writes a consistent record. Speed is not
asserted (timing targets live in the benchmark, never in timed tests); what is asserted
is that every implementation ran for every (model, B), that pytorch-ntm is run from the
folder given and only for the NTM, and that the targets are the rows' own ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import step as bench

FAKE_AIO = """
import torch
from torch import nn


class EncapsulatedNTM(nn.Module):  # the constructor and calls of pytorch-ntm's
    def __init__(self, inputs, outputs, controller_size, layers, heads, rows, width):
        super().__init__()
        self.layer = nn.Linear(inputs, outputs)
        self.sizes = (inputs, outputs, controller_size, layers, heads, rows, width)

    def init_sequence(self, batch):
        self.state = torch.zeros(batch, self.sizes[1])

    def forward(self, x):
        self.state = torch.sigmoid(self.layer(x)) + self.state
        return self.state, self.state
"""


@pytest.mark.timeout(300)
def test_tiny_run_writes_a_consistent_record(tmp_path: Path) -> None:
    fake = tmp_path / "pytorch-ntm"
    (fake / "ntm").mkdir(parents=True)
    (fake / "ntm" / "__init__.py").write_text("")
    (fake / "ntm" / "aio.py").write_text(FAKE_AIO)
    out = tmp_path / "step.json"
    argv = ["--batches", "1", "9", "--rounds", "2", "--seconds", "0.01", "--no-compile",
            "--profile-batch", "3", "--devices", "cpu", "--pytorch-ntm", str(fake),
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/step.py " + " ".join(argv)
    assert record["device"] and set(record["versions"]) >= {"python", "torch", "cc"}
    assert record["threads"] == 1 and record["fused_cpu_step"] == "available"
    assert str(fake) in record["pytorch_ntm"] and "load_1m" in record["load_before"]
    rows = {(row["model"], row["batch"]): row for row in record["rows"]}
    assert set(rows) == {(m, b) for m in bench.MODELS for b in (1, 9)}
    for (model, batch), row in rows.items():
        impls = {"memserve", "memserve_trusted", "memserve_torch", "eager"}
        if model == "ntm-copy":
            impls.add("pytorch_ntm")
        assert set(row["cpu_us"]) == impls, model
        for impl, rounds in row["rounds_cpu_us"].items():
            assert len(rounds) == 2 and all(t > 0 for t in rounds)
            assert row["steps_per_s_cpu"][impl] == pytest.approx(batch / row["cpu_us"][impl] * 1e6)
    checks = record["targets"]["checks"]
    assert {(c["model"], c["batch"], c["against"]) for c in checks} == {
        *((m, b, "eager") for m in bench.MODELS for b in (1, 9))
    }  # pytorch-ntm's target starts at B=64
    for check in checks:
        row = rows[(check["model"], check["batch"])]
        assert check["ratio"] == row["ratios_cpu"]["memserve_vs_eager"]
        assert check["passed"] == (check["ratio"] >= bench.EAGER_TARGET)
    assert record["targets"]["all_passed"] == all(c["passed"] for c in checks)
    for model in bench.MODELS:
        paths = record["profile"][model]
        assert paths["memserve_trusted (fused C step)"]["ops_per_step"] <= 3
        assert paths["memserve_trusted (PyTorch operations)"]["ops_per_step"] > 100


def test_a_snapshot_inside_the_repository_is_refused_and_a_missing_one_noted() -> None:
    with pytest.raises(SystemExit, match="inside this repository"):
        bench.load_pytorch_ntm(bench.ROOT / "bench")
    found, note = bench.load_pytorch_ntm(None)
    assert found is None and "--pytorch-ntm" in note


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        bench.parse_args(["--help"])
    assert done.value.code == 0
    assert "pytorch-ntm" in capsys.readouterr().out

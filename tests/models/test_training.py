"""`memserve train copy` and `memserve eval copy` end to end, at a size that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors.torch import load_file

from memserve.cli import main
from models import load

SMALL = [
    "--memory-rows", "12", "--memory-width", "6", "--controller-size", "24",
    "--min-length", "1", "--max-length", "4", "--bits", "4", "--batch-size", "8",
    "--quiet",
]  # fmt: skip


def train(out: Path, *extra: str) -> int:
    return main(["train", "copy", "--out", str(out), *SMALL, *extra])


def test_a_short_run_lowers_the_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(out, "--steps", "300", "--log-every", "50", "--lr", "3e-3") == 0
    history = json.loads((out / "training.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [50, 100, 150, 200, 250, 300]
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["bit_errors"] < first["bit_errors"]
    model = load(out)
    assert model.provenance["steps"] == 300
    assert model.provenance["task"] == "copy"
    assert model.provenance["task_settings"]["max_length"] == 4
    assert model.provenance["command"].startswith("memserve ")
    assert model.provenance["final_loss"] == pytest.approx(last["loss"])


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    """30 + 30 resumed steps give bit-identical weights to 60 steps in one go."""
    assert train(tmp_path / "straight", "--steps", "60", "--checkpoint-every", "30") == 0
    assert train(tmp_path / "split", "--steps", "30") == 0
    assert train(tmp_path / "split", "--steps", "60", "--resume") == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    for name, tensor in straight.items():
        assert torch.equal(tensor, split[name]), name


def test_training_refuses_to_overwrite_or_to_resume_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path / "run", "--steps", "5") == 0
    assert train(tmp_path / "run", "--steps", "10") == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert train(tmp_path / "run", "--steps", "5", "--resume") == 2
    assert "already reached step 5 of 5" in capsys.readouterr().err
    assert train(tmp_path / "empty", "--steps", "5", "--resume") == 2
    assert "holds no training run to resume" in capsys.readouterr().err
    assert train(tmp_path / "bad", "--steps", "5", "--min-length", "3", "--max-length", "2") == 2
    assert "--min-length" in capsys.readouterr().err


def test_eval_writes_a_table_json_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(out, "--steps", "20") == 0
    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    arguments = ["eval", "copy", "--model", str(out), "--lengths", "2,5", "--samples", "30"]
    assert main([*arguments, "--json", str(report), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert [r["length"] for r in result["results"]] == [2, 5]
    assert all(r["samples"] == 30 for r in result["results"])
    assert result["training_lengths"] == [1, 4]
    for r in result["results"]:
        assert 0 <= r["mean_bit_errors"] <= r["length"] * 4
        assert f"{r['mean_bit_errors']:.4f}" in table
    image = plt.imread(plot)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_eval_rejects_bad_lengths_and_non_copy_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "copy", "--model", "ntm-nope", "--lengths", "5"]) == 2
    assert "no bundled model" in capsys.readouterr().err
    assert main(["eval", "copy", "--lengths", "5,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["eval", "copy", "--lengths", "0"]) == 2
    assert "each >= 1" in capsys.readouterr().err

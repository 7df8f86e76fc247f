"""`memserve train copy` and `memserve eval copy` end to end, at a size that runs in seconds."""

from __future__ import annotations

import json
import random
import shlex
import subprocess
import sys
import time
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
    options = ["--steps", "300", "--log-every", "50", "--lr", "3e-3"]
    assert train(out, *options) == 0
    history = json.loads((out / "training.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [50, 100, 150, 200, 250, 300]
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["bit_errors"] < first["bit_errors"]
    model = load(out)
    assert model.provenance["steps"] == 300
    assert model.provenance["task"] == "copy"
    assert model.provenance["task_settings"]["max_length"] == 4
    typed = ["memserve", "train", "copy", "--out", str(out), *SMALL, *options]
    assert model.provenance["command"] == shlex.join(typed)
    assert model.provenance["final_loss"] == pytest.approx(last["loss"])


def test_a_run_killed_mid_way_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL a run at a random moment after its first checkpoint, resume it: the final
    weights and optimizer moments, and the exported best model, are bit-identical to those
    of the same run left alone."""
    steps = ["--steps", "100", "--checkpoint-every", "20"]
    assert train(tmp_path / "straight", *steps) == 0
    command = [sys.executable, "-m", "memserve", "train", "copy", "--out", str(tmp_path / "split")]
    process = subprocess.Popen([*command, *SMALL, *steps], stderr=subprocess.DEVNULL)
    state = tmp_path / "split" / "training-state.safetensors"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 1))  # anywhere in the rest of the run, even past its end
    process.kill()
    process.wait()
    assert state.exists()
    if process.returncode != 0:  # it was killed before the end
        assert train(tmp_path / "split", *steps, "--resume") == 0
    for name in ("training-state.safetensors", "model.safetensors"):
        straight = load_file(tmp_path / "straight" / name)
        split = load_file(tmp_path / "split" / name)
        assert straight.keys() == split.keys()
        for key, tensor in straight.items():
            assert torch.equal(tensor, split[key]), (name, key)


def test_training_refuses_to_overwrite_or_to_resume_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path / "run", "--steps", "5") == 0
    assert train(tmp_path / "run", "--steps", "10") == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert train(tmp_path / "run", "--steps", "5", "--resume") == 2
    assert "already finished (step 5 of 5)" in capsys.readouterr().err
    assert train(tmp_path / "run", "--steps", "9", "--lr", "0.01", "--resume") == 2
    error = capsys.readouterr().err
    assert "differs in steps 9 (the run has 5), learning-rate 0.01 (the run has 0.001)" in error
    assert train(tmp_path / "empty", "--steps", "5", "--resume") == 2
    assert "holds no training run to resume" in capsys.readouterr().err
    assert train(tmp_path / "bad", "--steps", "5", "--min-length", "3", "--max-length", "2") == 2
    assert "--min-length" in capsys.readouterr().err
    assert train(tmp_path / "bad", "--steps", "5", "--threads", "0") == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    (tmp_path / "run" / "training-state.safetensors").unlink()  # a plain checkpoint remains
    assert train(tmp_path / "run", "--steps", "5") == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


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
    missing = tmp_path / "no" / "such" / "eval.json"
    assert main(["eval", "copy", "--lengths", "5", "--json", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err

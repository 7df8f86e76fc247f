"""`memserve train copy` and `memserve eval copy` end to end, at a size that runs in seconds."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memserve.cli import main
from models import load
from models.ntm import NTMConfig

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


def read_line(descriptor: int) -> bytes:
    """One line from a pipe, read a byte at a time: nothing after it leaves the pipe."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(descriptor, 1)
        if not byte:
            break
        line += byte
    return line


def test_a_run_killed_mid_way_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL a run at a random moment after its first checkpoint and before its end, resume
    it: the final weights and optimizer moments, and the exported best model, are
    bit-identical to those of the same run left alone.

    The kill provably lands before the end: the run's progress goes to a pipe of one page
    that the test reads a line at a time, and stops reading once the run has reported its
    step-20 checkpoint saved and a random number of lines more. From then on the run can
    write at most a page more before it blocks, and each step's progress line has at least
    62 bytes (its fixed text and the fewest digits of its numbers), so the run blocks (or is
    killed) before step 20 + 40 + 4096 / 62 < 140."""
    steps = ["--steps", "140", "--checkpoint-every", "20", "--log-every", "1"]
    assert train(tmp_path / "straight", *steps) == 0
    command = [sys.executable, "-m", "memserve", "train", "copy", "--out", str(tmp_path / "split")]
    read_end, write_end = os.pipe()
    page = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    assert page <= 4096
    loud = [option for option in SMALL if option != "--quiet"]
    process = subprocess.Popen([*command, *loud, *steps], stderr=write_end)
    os.close(write_end)
    try:
        lines = [read_line(read_end)]
        while lines[-1] and not lines[-1].startswith(b"checkpoint at step 20 saved"):
            lines.append(read_line(read_end))
        assert lines[-1], b"".join(lines).decode()  # the run ended without reporting it
        progress = [read_line(read_end) for _ in range(random.randint(0, 40))]
        # Past step 40 a checkpoint's line comes too (longer than a step's: the bound holds).
        lines_seen = (b"step ", b"checkpoint at step ")
        assert all(line.startswith(lines_seen) and len(line) >= 62 for line in progress), progress
    finally:
        process.kill()
        process.wait()
        os.close(read_end)
    assert process.returncode == -signal.SIGKILL
    with safe_open(tmp_path / "split" / "training-state.safetensors", framework="pt") as state:
        assert 20 <= json.loads(state.metadata()["run"])["step"] < 140
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
    # A run that predates a setting ran with its default: a resume may not give another.
    state_path = tmp_path / "run" / "training-state.safetensors"
    with safe_open(state_path, framework="pt") as state:
        metadata = state.metadata()
    run = json.loads(metadata["run"])
    del run["hyperparameters"]["controller_size"]
    default = NTMConfig.__dataclass_fields__["controller_size"].default
    save_file(load_file(state_path), state_path, {**metadata, "run": json.dumps(run)})
    assert train(tmp_path / "run", "--steps", "5", "--resume") == 2  # SMALL: 24
    error = capsys.readouterr().err
    assert f"controller-size 24 (the run predates it: it ran with {default})" in error
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

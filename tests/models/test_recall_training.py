"""`memserve train recall` and `memserve eval recall` end to end, at a size that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from memserve.cli import main
from models import load
from models.dnc import DNC

SMALL = [
    "--memory-rows", "10", "--word-size", "5", "--controller-size", "16", "--read-heads", "2",
    "--min-items", "2", "--max-items", "3", "--bits", "3", "--item-size", "2",
    "--batch-size", "4", "--quiet",
]  # fmt: skip


def train(out: Path, *extra: str) -> int:
    return main(["train", "recall", "--out", str(out), *SMALL, *extra])


@pytest.mark.parametrize("links", [True, False])
def test_training_writes_a_dnc_that_eval_scores(
    links: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    extra = [] if links else ["--no-links"]
    assert train(out, "--steps", "12", "--log-every", "4", "--checkpoint-every", "6", *extra) == 0
    run = json.loads((out / "training.json").read_text())
    assert [entry["step"] for entry in run["history"]] == [4, 8, 12]
    assert [record["step"] for record in run["validations"]] == [6, 12]
    model = load(out)
    assert isinstance(model, DNC)
    assert model.config.use_links is links
    assert (model.config.memory_rows, model.config.word_size, model.config.read_heads) == (10, 5, 2)
    assert (model.input_size, model.output_size) == (5, 3)
    assert model.provenance["task"] == "recall"
    assert model.provenance["task_settings"]["item_size"] == 2
    assert model.provenance["command"].startswith("memserve ")
    capsys.readouterr()

    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    arguments = ["eval", "recall", "--model", str(out), "--items", "2,5", "--samples", "20"]
    assert main([*arguments, "--json", str(report), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert [r["items"] for r in result["results"]] == [2, 5]
    assert result["training_items"] == [2, 3]
    assert result["item_size"] == 2 and result["bits"] == 3
    assert result["samples_per_count"] == 20
    for r in result["results"]:
        assert r["samples"] == 20
        assert 0 <= r["mean_bit_errors"] <= 3 * 2
        assert f"{r['mean_bit_errors']:.4f}" in table
    image = plt.imread(plot)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_bad_arguments_and_non_recall_models_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path / "bad", "--steps", "2", "--min-items", "1") == 2
    assert "--min-items" in capsys.readouterr().err
    assert train(tmp_path / "bad", "--steps", "2", "--max-items", "9", "--bits", "1") == 2
    assert "9 distinct items need more than 2 bits" in capsys.readouterr().err
    copy_model = tmp_path / "copy"
    copy_arguments = ["--memory-rows", "8", "--memory-width", "4", "--controller-size", "8"]
    assert main(["train", "copy", "--out", str(copy_model), "--steps", "1", "--quiet",
                 *copy_arguments]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "recall", "--model", str(copy_model), "--items", "3"]) == 2
    assert "not an associative-recall model" in capsys.readouterr().err
    assert main(["eval", "recall", "--model", str(copy_model), "--items", "3,x"]) == 2
    assert "--items must be comma-separated integers" in capsys.readouterr().err

"""The shipped `dnc-recall` model does what docs/models.md says, trained and served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memserve.evaluate import size_generator
from models import bundled_names, load
from models.dnc import DNC
from models.tasks.recall import evaluate_recall, recall_batch
from tests.models.agreement import assert_served_like_forward

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_it_is_bundled_and_loads_by_name() -> None:
    assert "dnc-recall" in bundled_names()
    model = load("dnc-recall")
    assert isinstance(model, DNC)
    assert model.config.use_links
    assert model.provenance["task"] == "recall"
    assert model.provenance["command"].startswith("memserve train recall")


def test_the_documented_training_range_row_is_reproduced() -> None:
    """The documented evaluation at 6 items (the longest trained), recomputed exactly."""
    report = json.loads((DOCS / "results" / "dnc-recall-eval.json").read_text())
    documented = next(r for r in report["results"] if r["items"] == 6)
    model = load("dnc-recall")
    generator = size_generator(report["seed"], 6)
    result = evaluate_recall(
        model, 6, report["samples_per_count"], generator, report["bits"], report["item_size"]
    )
    assert result == documented
    assert result["mean_bit_errors"] < 0.1  # the target stated before training


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_served_step_by_step_it_recalls_as_well(
    backend: str, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Sessions share one pool and one step per time step, as on a server; each answers its
    own query, with the same bit errors as the training forward."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", backend)
    model = load("dnc-recall")
    sessions, most_items = (2, 4) if backend == "triton" else (32, 6)  # the interpreter is slow
    batch = recall_batch(sessions, 2, most_items, generator, model.output_size, 3)  # mixed
    assert_served_like_forward(model, batch, generator)

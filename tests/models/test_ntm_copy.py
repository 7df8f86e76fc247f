"""The shipped `ntm-copy` model does what docs/models.md says, trained and served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memserve.evaluate import size_generator
from models import bundled_names, load
from models.ntm import NTM
from models.tasks.copy import copy_batch, evaluate_copy
from tests.models.agreement import assert_served_like_forward

DOCS = Path(__file__).resolve().parents[2] / "docs"
TARGET_AT_20 = 0.05  # mean bit errors per sequence at length 20 (the target)


def test_it_is_bundled_and_loads_by_name() -> None:
    assert "ntm-copy" in bundled_names()
    model = load("ntm-copy")
    assert isinstance(model, NTM)
    config = model.config
    assert (config.memory_rows, config.memory_width) == (128, 20)
    assert (config.read_heads, config.write_heads, config.controller_size) == (1, 1, 100)
    assert model.provenance["task"] == "copy"
    assert model.provenance["command"].startswith("memserve train copy")


def test_it_copies_length_20_within_the_target_as_documented() -> None:
    """The documented evaluation at length 20 (docs/results/ntm-copy-eval.json: 1,000 fixed
    sequences), recomputed: it meets the target and reproduces the committed number."""
    report = json.loads((DOCS / "results" / "ntm-copy-eval.json").read_text())
    documented = next(r for r in report["results"] if r["length"] == 20)
    generator = size_generator(report["seed"], 20)
    result = evaluate_copy(load("ntm-copy"), 20, report["samples_per_length"], generator)
    assert result["mean_bit_errors"] < TARGET_AT_20
    assert result == documented


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_served_step_by_step_it_copies_as_well(
    backend: str, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Sessions of mixed lengths share one pool and one step per time step, as on a server;
    every session copies its own sequence (bit errors identical to the training forward)."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", backend)
    model = load("ntm-copy")
    sessions = 4 if backend == "triton" else 32  # the interpreter is slow
    batch = copy_batch(sessions, 2, 12, generator)  # mixed lengths, padded to the longest
    assert_served_like_forward(model, batch, generator)

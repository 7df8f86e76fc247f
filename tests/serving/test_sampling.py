"""`sample_tokens`, the batched sampler of Generate, against a per-row reference written
out in plain Python from the rules it documents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serving.generation import sample_tokens


def reference(logits: list[float], temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One row, the slow and obvious way."""
    if temperature == 0:
        return max(range(len(logits)), key=lambda i: (logits[i], -i))
    scaled = [float(np.float32(x) / np.float32(temperature)) for x in logits]
    ranked = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    if top_k:
        ranked = ranked[:top_k]
    top = scaled[ranked[0]]
    weights = [math.exp(scaled[i] - top) for i in ranked]
    total = sum(weights)
    probabilities = [w / total for w in weights]
    kept, mass = [], 0.0
    for token, probability in zip(ranked, probabilities, strict=True):
        if mass >= top_p:  # the smallest set whose mass reaches top_p
            break
        kept.append((token, probability))
        mass += probability
    point = u * sum(p for _, p in kept)
    running = 0.0
    for token, probability in kept:
        running += probability
        if running > point:
            return token
    return kept[-1][0]


@pytest.mark.parametrize("vocab", [7, 300])
def test_every_row_samples_as_the_reference_does(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    rows = 400
    logits = rng.standard_normal((rows, vocab)) * rng.uniform(0.1, 6, (rows, 1))
    temperature = rng.choice([0.0, 0.3, 1.0, 2.5], rows)
    temperature[:40] = 0
    logits[:40, :3] = logits[:40, 2:3] + 100  # greedy takes the first of tied maxima
    top_k = rng.choice([0, 1, 2, 5, vocab, vocab + 3], rows)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1, 1e-9], rows)
    uniform = rng.random(rows)
    got = sample_tokens(
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(temperature),
        torch.tensor(top_k),
        torch.tensor(top_p),
        torch.tensor(uniform),
    )
    logits32 = logits.astype(np.float32).astype(np.float64)  # what the sampler saw
    expected = [
        reference(list(logits32[r]), temperature[r], int(top_k[r]), top_p[r], uniform[r])
        for r in range(rows)
    ]
    assert got.tolist() == expected


def test_a_row_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.standard_normal((64, 500)), dtype=torch.float32)
    settings = (torch.full((64,), 0.8), torch.full((64,), 40), torch.full((64,), 0.9))
    uniform = torch.tensor(rng.random(64))
    together = sample_tokens(logits, *settings, uniform)
    temperature, top_k, top_p = settings
    alone = [
        int(sample_tokens(logits[r], temperature[r], top_k[r], top_p[r], uniform[r]))
        for r in (slice(i, i + 1) for i in range(64))
    ]
    assert together.tolist() == alone


def test_draws_follow_the_distribution() -> None:
    """Uniform points give each kept token its renormalised probability."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    uniform = torch.tensor(np.random.default_rng(1).random(20000))
    ones = torch.ones(20000)
    counts = np.bincount(
        sample_tokens(logits, ones, torch.zeros(20000, dtype=torch.long), 0.75 * ones, uniform),
        minlength=4,
    )
    assert counts[3] == 0 and counts[2] == 0  # 0.5 + 0.3 reach 0.75: the rest is cut
    assert abs(counts[0] / 20000 - 0.5 / 0.8) < 0.02

"""`sample_tokens`, the batched sampler of Generate, against a per-row reference written
out in plain Python from the rules it documents."""

from __future__ import annotations

import numpy as np
import pytest

from serving.sampling import sample_tokens


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One row, the slow and obvious way (numpy only for the same float32 scaling and exp)."""
    values = [float(x) for x in logits]
    if temperature == 0:
        return max(range(len(values)), key=lambda i: (values[i], -i))
    scaled = logits.astype(np.float32) / np.float32(temperature)
    weights = [float(w) for w in np.exp(scaled - scaled.max())]
    ranked = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    candidates = ranked[:top_k] if top_k else ranked
    within = sum(weights[i] for i in candidates)
    kept, mass = [], 0.0
    for token in candidates:  # the fewest most likely tokens whose mass reaches top_p
        if mass >= top_p * within:
            break
        kept.append(token)
        mass += weights[token]
    kept += [t for t in ranked[len(kept) :] if weights[t] == weights[kept[-1]]]  # ties
    point, running = u * sum(weights[t] for t in kept), 0.0
    for token in kept:
        running += weights[token]
        if running > point:
            return token
    return kept[-1]


@pytest.mark.parametrize("vocab", [7, 300])
def test_every_row_samples_as_the_reference_does(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    rows = 400
    logits = rng.standard_normal((rows, vocab)) * rng.uniform(0.1, 6, (rows, 1))
    temperature = rng.choice([0.0, 0.3, 1.0, 2.5], rows)
    temperature[:40] = 0
    logits[:40, :3] = logits[:40, 2:3] + 100  # greedy takes the first of tied maxima
    logits[40:80, 1:vocab:2] = logits[40:80, :1]  # ties: ranked by token id
    top_k = rng.choice([0, 1, 2, 5, vocab, vocab + 3], rows)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1, 1e-9], rows)
    uniform = rng.random(rows)
    logits = logits.astype(np.float32)
    got = sample_tokens(logits, temperature, top_k, top_p, uniform)
    expected = [
        reference(logits[r], temperature[r], int(top_k[r]), top_p[r], uniform[r])
        for r in range(rows)
    ]
    assert got.tolist() == expected


def test_a_row_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 500)).astype(np.float32)
    temperature, top_k, top_p = np.full(64, 0.8), np.full(64, 40), np.full(64, 0.9)
    uniform = rng.random(64)
    together = sample_tokens(logits, temperature, top_k, top_p, uniform)
    alone = [
        int(sample_tokens(logits[r], temperature[r], top_k[r], top_p[r], uniform[r])[0])
        for r in (slice(i, i + 1) for i in range(64))
    ]
    assert together.tolist() == alone


def test_draws_follow_the_distribution() -> None:
    """Uniform points give each kept token its renormalised probability; ties with the
    last token kept are kept too."""
    draws = 20000
    probabilities = np.array([0.5, 0.3, 0.1, 0.1])
    logits = np.log(np.tile(probabilities, (draws, 1))).astype(np.float32)
    uniform = np.random.default_rng(1).random(draws)
    ones, no_limit = np.ones(draws), np.zeros(draws, np.int64)
    counts = np.bincount(sample_tokens(logits, ones, no_limit, 0.75 * ones, uniform), minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reach 0.75: the rest is cut
    assert abs(counts[0] / draws - 0.5 / 0.8) < 0.02
    counts = np.bincount(sample_tokens(logits, ones, no_limit, 0.85 * ones, uniform), minlength=4)
    assert abs(counts[3] / draws - 0.1) < 0.02  # tied with token 2, the last one needed
    counts = np.bincount(sample_tokens(logits, 0 * ones, no_limit, ones, uniform), minlength=4)
    assert counts[0] == draws  # greedy

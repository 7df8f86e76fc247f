"""The PyTorch reference (the spec) against an element-by-element reading of the equations."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import reference
from kernels.samples import random_ntm_params, random_ntm_pools
from tests.conftest import assert_step_matches_float64, relative_error


def naive_step(
    memory: list[list[float]],
    previous: list[list[float]],
    keys: list[list[float]],
    beta: list[float],
    gate: list[float],
    shift: list[list[float]],
    gamma: list[float],
    erase: list[list[float]],
    add: list[list[float]],
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """One session's step in plain Python floats, straight from the issue's equations."""
    rows, width = len(memory), len(memory[0])
    heads, num_write = len(keys), len(erase)
    radius = (len(shift[0]) - 1) // 2
    new_weights = []
    for h in range(heads):
        key_norm = math.sqrt(sum(k * k for k in keys[h]))
        scores = []
        for n in range(rows):
            row_norm = math.sqrt(sum(v * v for v in memory[n]))
            dot = sum(keys[h][m] * memory[n][m] for m in range(width))
            scores.append(beta[h] * dot / (key_norm * row_norm + 1e-8))
        peak = max(scores)
        total = sum(math.exp(s - peak) for s in scores)
        content = [math.exp(s - peak) / total for s in scores]
        gated = [gate[h] * content[n] + (1 - gate[h]) * previous[h][n] for n in range(rows)]
        shifted = [
            sum(shift[h][j + radius] * gated[(i - j) % rows] for j in range(-radius, radius + 1))
            for i in range(rows)
        ]
        powered = [s ** gamma[h] for s in shifted]
        norm = sum(powered) + 1e-16
        new_weights.append([p / norm for p in powered])
    num_read = heads - num_write
    reads = [
        [sum(new_weights[h][n] * memory[n][m] for n in range(rows)) for m in range(width)]
        for h in range(num_read)
    ]
    new_memory = []
    for n in range(rows):
        row = []
        for m in range(width):
            keep = 1.0
            added = 0.0
            for h in range(num_write):
                w = new_weights[num_read + h][n]
                keep *= 1 - w * erase[h][m]
                added += w * add[h][m]
            row.append(memory[n][m] * keep + added)
        new_memory.append(row)
    return reads, new_weights, new_memory


@pytest.mark.parametrize(
    ("rows", "width", "num_read", "num_write", "radius"),
    [(7, 3, 1, 1, 1), (10, 4, 2, 1, 3), (5, 2, 0, 2, 0), (6, 5, 2, 0, 2)],
)
def test_reference_step_matches_equations(
    generator: torch.Generator, rows: int, width: int, num_read: int, num_write: int, radius: int
) -> None:
    heads = num_read + num_write
    memory, weights = random_ntm_pools(4, heads, rows, width, generator, dtype=torch.float64)
    params = random_ntm_params(3, num_read, num_write, width, radius, generator).to(torch.float64)
    slots = torch.tensor([2, -1, 0])
    before_memory, before_weights = memory.clone(), weights.clone()

    reads = reference.ntm_memory_step(memory, weights, slots, *params.tensors())

    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(reads[row], torch.zeros_like(reads[row]))
            continue
        expected_reads, expected_weights, expected_memory = naive_step(
            before_memory[slot].tolist(),
            before_weights[slot].tolist(),
            *(tensor[row].tolist() for tensor in params.tensors()),
        )
        if num_read:
            assert (
                relative_error(reads[row], torch.tensor(expected_reads, dtype=torch.float64))
                < 1e-12
            )
        assert (
            relative_error(weights[slot], torch.tensor(expected_weights, dtype=torch.float64))
            < 1e-12
        )
        assert (
            relative_error(memory[slot], torch.tensor(expected_memory, dtype=torch.float64)) < 1e-12
        )
    untouched = [1, 3]
    assert torch.equal(memory[untouched], before_memory[untouched])
    assert torch.equal(weights[untouched], before_weights[untouched])


def test_float32_reference_is_close_to_float64(generator: torch.Generator) -> None:
    memory, weights = random_ntm_pools(6, 3, 100, 20, generator)
    params = random_ntm_params(4, 2, 1, 20, 1, generator)
    slots = torch.tensor([5, 0, -1, 3])
    memory64, weights64 = memory.double(), weights.double()
    for _ in range(3):
        reads = reference.ntm_memory_step(memory, weights, slots, *params.tensors())
        assert_step_matches_float64(reads, memory, weights, (memory64, weights64), slots, params)


def test_shift_moves_weight_in_the_positive_direction() -> None:
    weights = torch.zeros(1, 6, dtype=torch.float64)
    weights[0, 5] = 1.0
    by_plus_one = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)  # entries j = -1, 0, +1
    by_minus_one = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    split = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    assert reference.circular_shift(weights, by_plus_one).tolist() == [[1, 0, 0, 0, 0, 0]]
    assert reference.circular_shift(weights, by_minus_one).tolist() == [[0, 0, 0, 0, 1, 0]]
    assert reference.circular_shift(weights, split).tolist() == [[0.25, 0, 0, 0, 0.25, 0.5]]


def test_sharpening_by_hand() -> None:
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    gamma = torch.tensor([2.0, 3.0], dtype=torch.float64)
    sharpened = reference.sharpen(weights, gamma)
    expected = torch.tensor([0.04, 0.09, 0.25], dtype=torch.float64) / 0.38
    assert torch.allclose(sharpened[0], expected, rtol=1e-14, atol=0)
    assert sharpened[1].tolist() == [0.0, 0.0, 0.0]


def test_pieces_are_differentiable(generator: torch.Generator) -> None:
    """Models train through the pieces: gradients agree with finite differences."""
    params = random_ntm_params(2, 1, 1, 4, 1, generator).to(torch.float64)
    memory = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    previous = torch.softmax(torch.randn(2, 2, 5, generator=generator, dtype=torch.float64), -1)
    originals = (
        memory,
        previous,
        params.keys,
        params.beta,
        params.gate,
        params.shift,
        params.gamma,
    )
    inputs = tuple(tensor.clone().requires_grad_() for tensor in originals)

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weighting = reference.address(*args)
        return reference.read(args[0], weighting[:, :1]), reference.write(
            args[0], weighting[:, 1:], params.erase, params.add
        )

    assert torch.autograd.gradcheck(step, inputs)

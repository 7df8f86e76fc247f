"""The copy task's batches and scores, checked against sequences built by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from models.tasks.copy import CopyBatch, bit_errors, copy_batch, evaluate_copy


def test_batches_follow_the_paper_layout(generator: torch.Generator) -> None:
    bits = 6
    batch = copy_batch(16, 1, 9, generator, bits)
    longest = int(batch.lengths.max())
    assert batch.inputs.shape == (16, 2 * longest + 1, bits + 1)
    assert batch.targets.shape == batch.mask.shape == (16, 2 * longest + 1, bits)
    for b in range(16):
        length = int(batch.lengths[b])
        assert 1 <= length <= 9
        sequence = batch.inputs[b, :length, :bits]
        assert set(torch.unique(sequence).tolist()) <= {0.0, 1.0}
        delimiter = torch.zeros(bits + 1)
        delimiter[bits] = 1
        for t in range(2 * longest + 1):
            if t < length:
                assert batch.inputs[b, t, bits] == 0  # data steps carry no delimiter
            elif t == length:
                assert torch.equal(batch.inputs[b, t], delimiter)
            else:
                assert not batch.inputs[b, t].any()  # recall steps and padding are blank
            recalling = length < t <= 2 * length
            assert bool((batch.mask[b, t] == 1).all()) == recalling
            assert bool((batch.mask[b, t] == 0).all()) == (not recalling)
            if recalling:
                assert torch.equal(batch.targets[b, t], sequence[t - length - 1])


class Oracle(nn.Module):
    """Replays the presented sequence after the delimiter; `invert` gets every bit wrong."""

    def __init__(self, bits: int, invert: bool = False) -> None:
        super().__init__()
        self.bits, self.sign = bits, -1.0 if invert else 1.0
        self.unused = nn.Parameter(torch.zeros(1))  # evaluate_copy asks for a device

    def forward(self, inputs: Tensor, activate: bool = True) -> Tensor:
        batch, steps, _ = inputs.shape
        length = int(inputs[0, :, self.bits].argmax())
        recall = torch.zeros(batch, steps, self.bits)
        recall[:, length + 1 : 2 * length + 1] = inputs[:, :length, : self.bits]
        return self.sign * (2 * recall - 1) * 10


@pytest.mark.parametrize("length", [1, 7])
def test_scores_count_wrong_bits_in_the_recall_phase_only(
    length: int, generator: torch.Generator
) -> None:
    bits = 8
    perfect = evaluate_copy(Oracle(bits), length, 30, generator, bits, chunk=7)
    assert perfect["mean_bit_errors"] == 0 and perfect["perfect_fraction"] == 1
    wrong = evaluate_copy(Oracle(bits, invert=True), length, 30, generator, bits)
    assert wrong["mean_bit_errors"] == wrong["max_bit_errors"] == length * bits
    assert wrong["perfect_fraction"] == 0 and wrong["samples"] == 30


def test_bit_errors_ignore_unscored_steps(generator: torch.Generator) -> None:
    batch = copy_batch(4, 3, 3, generator)
    logits = Oracle(8)(batch.inputs)
    logits[:, :4] *= -1  # wrong outputs while the sequence is presented: not scored
    assert torch.equal(bit_errors(logits, batch), torch.zeros(4))
    logits[1, 5, 2] *= -1
    logits[3, 6, :3] *= -1
    assert bit_errors(logits, batch).tolist() == [0, 1, 0, 3]
    assert isinstance(batch, CopyBatch)


def test_invalid_lengths_are_refused(generator: torch.Generator) -> None:
    with pytest.raises(ValueError, match="1 <= min <= max"):
        copy_batch(2, 0, 3, generator)
    with pytest.raises(ValueError, match="1 <= min <= max"):
        copy_batch(2, 5, 3, generator)

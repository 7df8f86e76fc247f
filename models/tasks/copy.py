"""The NTM copy task (Graves et al. 2014, section 4.1).

A sequence of T random 8-bit vectors is presented, then a delimiter on a channel of its own,
then T blank steps during which the model must output the sequence again. Inputs have
`bits + 1` channels, outputs `bits`; only the recall phase is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from models.tasks.bits import BitTask, bit_errors, bit_loss, evaluate_bits

__all__ = ["CopyBatch", "CopyTask", "bit_errors", "bit_loss", "copy_batch", "evaluate_copy"]

# Seeds the validation set; training batches come from generators seeded by (seed, step).
VALIDATION_SEED = 2_718_281_828


@dataclass
class CopyBatch:
    """Inputs `[B, 2T+1, bits+1]`, targets and mask `[B, 2T+1, bits]` (mask 1 where scored)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    lengths: Tensor  # [B] int64, each sequence's T

    def to(self, device: torch.device | str) -> CopyBatch:
        return CopyBatch(
            *(t.to(device) for t in (self.inputs, self.targets, self.mask, self.lengths))
        )


def copy_batch(
    batch: int,
    min_length: int,
    max_length: int,
    generator: torch.Generator,
    bits: int = 8,
) -> CopyBatch:
    """`batch` sequences with lengths uniform in `min_length..max_length`, padded to the longest.

    Sequence b occupies steps 0..2T_b; after that its inputs are blank and nothing is scored,
    so sequences of different lengths share a batch without changing each other's task.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(f"copy lengths need 1 <= min <= max, got {min_length}..{max_length}")
    lengths = torch.randint(min_length, max_length + 1, (batch,), generator=generator)
    longest = int(lengths.max())
    steps = 2 * longest + 1
    vectors = torch.randint(0, 2, (batch, longest, bits), generator=generator).float()
    inputs = torch.zeros(batch, steps, bits + 1)
    targets = torch.zeros(batch, steps, bits)
    mask = torch.zeros(batch, steps, bits)
    for b, length in enumerate(lengths.tolist()):
        inputs[b, :length, :bits] = vectors[b, :length]
        inputs[b, length, bits] = 1.0
        targets[b, length + 1 : 2 * length + 1] = vectors[b, :length]
        mask[b, length + 1 : 2 * length + 1] = 1.0
    return CopyBatch(inputs, targets, mask, lengths)


@dataclass(frozen=True)
class CopyTask(BitTask):
    """Training batches for the copy task: one length per batch, uniform in
    `min_length..max_length` across batches, as in the paper."""

    batch_size: int
    min_length: int = 1
    max_length: int = 20
    bits: int = 8
    name: str = "copy"
    validation_seed: ClassVar[int] = VALIDATION_SEED

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 1 <= self.min_length <= self.max_length or self.bits < 1:
            raise ValueError(
                f"copy needs 1 <= min <= max length and bits >= 1, got {self.min_length}.."
                f"{self.max_length}, {self.bits}"
            )

    def size_range(self) -> tuple[int, int]:
        return self.min_length, self.max_length

    def draw(self, count: int, size: int, generator: torch.Generator) -> CopyBatch:
        return copy_batch(count, size, size, generator, self.bits)


def evaluate_copy(
    model: torch.nn.Module,
    length: int,
    samples: int,
    generator: torch.Generator,
    bits: int = 8,
    chunk: int = 250,
) -> dict[str, float]:
    """Bit errors per sequence of `samples` fresh sequences of one length.

    Returns the mean, the standard error of the mean, the worst sequence and the fraction
    copied without a single wrong bit.
    """
    draw = lambda count: copy_batch(count, length, length, generator, bits)  # noqa: E731
    return {"length": length, **evaluate_bits(model, draw, samples, chunk)}

"""What the bit-vector tasks (copy, associative recall) share: the masked loss and bit-error
count, the training loss and validation the training loop asks for, and the evaluation
summary. A task supplies only how to draw a batch of sequences of one size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

VALIDATION_BATCHES = 4  # of 256 sequences: failures of trained models are rare but whole
VALIDATION_BATCH_SIZE = 256


class BitBatch(Protocol):
    """Inputs `[B, T, in]`, targets and mask `[B, T, bits]` (mask 1 where scored)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> BitBatch:
        """The same batch on `device`."""
        ...


def bit_loss(logits: Tensor, batch: BitBatch) -> Tensor:
    """Binary cross-entropy per scored bit, averaged over the scored bits of the batch."""
    losses = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")
    return (losses * batch.mask).sum() / batch.mask.sum()


def bit_errors(logits: Tensor, batch: BitBatch) -> Tensor:
    """Wrong bits per sequence `[B]` (outputs thresholded at 0.5), scored steps only."""
    predicted = (logits > 0).float()
    return ((predicted != batch.targets).float() * batch.mask).sum(dim=(1, 2))


@torch.no_grad()
def evaluate_bits(
    model: torch.nn.Module,
    draw: Callable[[int], BitBatch],
    samples: int,
    chunk: int = 250,
) -> dict[str, float]:
    """Bit errors of `samples` sequences drawn `chunk` at a time by `draw(count)`: the mean
    per sequence, its standard error, the worst sequence and the fraction without an error."""
    if samples < 1 or chunk < 1:
        raise ValueError(f"samples and chunk must be >= 1, got {samples}, {chunk}")
    device = next(model.parameters()).device
    errors = []
    for start in range(0, samples, chunk):
        batch = draw(min(chunk, samples - start)).to(device)
        errors.append(bit_errors(model(batch.inputs, activate=False), batch).cpu())
    per_sequence = torch.cat(errors).double()
    return {
        "samples": samples,
        "mean_bit_errors": float(per_sequence.mean()),
        "standard_error": float(per_sequence.std() / samples**0.5) if samples > 1 else 0.0,
        "max_bit_errors": float(per_sequence.max()),
        "perfect_fraction": float((per_sequence == 0).double().mean()),
    }


class BitTask(ABC):
    """A training task over bit vectors: one size per batch, uniform in `size_range()`.

    One size per batch keeps every step of a batch useful (no padding). Validation is
    VALIDATION_BATCHES x VALIDATION_BATCH_SIZE fixed sequences of the largest size.
    """

    batch_size: int
    validation_seed: ClassVar[int]

    @abstractmethod
    def size_range(self) -> tuple[int, int]:
        """The smallest and largest training size (sequence length, item count)."""

    @abstractmethod
    def draw(self, count: int, size: int, generator: torch.Generator) -> BitBatch:
        """`count` sequences of one size."""

    def loss(
        self,
        model: torch.nn.Module,
        generator: torch.Generator,
        device: torch.device,
        step: int = 0,  # unused: bit tasks have no schedule
    ) -> tuple[Tensor, dict[str, float]]:
        low, high = self.size_range()
        size = int(torch.randint(low, high + 1, (1,), generator=generator))
        batch = self.draw(self.batch_size, size, generator).to(device)
        logits = model(batch.inputs, activate=False)
        errors = bit_errors(logits.detach(), batch)
        return bit_loss(logits, batch), {"bit_errors": float(errors.mean())}

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Bit errors per sequence, then loss, on the fixed validation sequences."""
        generator = torch.Generator().manual_seed(self.validation_seed)
        largest = self.size_range()[1]
        errors, losses = [], []
        for _ in range(VALIDATION_BATCHES):
            batch = self.draw(VALIDATION_BATCH_SIZE, largest, generator).to(device)
            logits = model(batch.inputs, activate=False)
            errors.append(float(bit_errors(logits, batch).mean()))
            losses.append(float(bit_loss(logits, batch)))
        return {"bit_errors": sum(errors) / len(errors), "loss": sum(losses) / len(losses)}

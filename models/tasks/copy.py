"""The NTM copy task (Graves et al. 2014, section 4.1).

A sequence of T random 8-bit vectors is presented, then a delimiter on a channel of its own,
then T blank steps during which the model must output the sequence again. Inputs have
`bits + 1` channels, outputs `bits`; only the recall phase is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


def copy_loss(logits: Tensor, batch: CopyBatch) -> Tensor:
    """Binary cross-entropy per scored bit, averaged over the scored bits of the batch."""
    losses = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")
    return (losses * batch.mask).sum() / batch.mask.sum()


def bit_errors(logits: Tensor, batch: CopyBatch) -> Tensor:
    """Wrong bits per sequence `[B]` (outputs thresholded at 0.5), recall phase only."""
    predicted = (logits > 0).float()
    return ((predicted != batch.targets).float() * batch.mask).sum(dim=(1, 2))


@dataclass(frozen=True)
class CopyTask:
    """Training batches for the copy task: one length per batch, uniform in the range.

    One length per batch keeps every step of a batch useful (no padding); across batches the
    lengths are uniform in `min_length..max_length`, as in the paper.
    """

    batch_size: int
    min_length: int = 1
    max_length: int = 20
    bits: int = 8
    name: str = "copy"

    def loss(
        self, model: torch.nn.Module, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, dict[str, float]]:
        length = int(torch.randint(self.min_length, self.max_length + 1, (1,), generator=generator))
        batch = copy_batch(self.batch_size, length, length, generator, self.bits).to(device)
        logits = model(batch.inputs, activate=False)
        errors = bit_errors(logits.detach(), batch)
        return copy_loss(logits, batch), {"bit_errors": float(errors.mean())}

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Bit errors per sequence, then loss, on 1,024 fixed sequences of the longest length.

        That many, because a trained model's failures are rare but whole: a sequence it gets
        wrong costs dozens of bits, and a small validation set would not see one.
        """
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        errors, losses = [], []
        for _ in range(4):
            batch = copy_batch(256, self.max_length, self.max_length, generator, self.bits)
            batch = batch.to(device)
            logits = model(batch.inputs, activate=False)
            errors.append(float(bit_errors(logits, batch).mean()))
            losses.append(float(copy_loss(logits, batch)))
        return {"bit_errors": sum(errors) / len(errors), "loss": sum(losses) / len(losses)}


@torch.no_grad()
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
    device = next(model.parameters()).device
    errors = []
    for start in range(0, samples, chunk):
        batch = copy_batch(min(chunk, samples - start), length, length, generator, bits).to(device)
        errors.append(bit_errors(model(batch.inputs, activate=False), batch).cpu())
    per_sequence = torch.cat(errors).double()
    return {
        "length": length,
        "samples": samples,
        "mean_bit_errors": float(per_sequence.mean()),
        "standard_error": float(per_sequence.std() / samples**0.5) if samples > 1 else 0.0,
        "max_bit_errors": float(per_sequence.max()),
        "perfect_fraction": float((per_sequence == 0).double().mean()),
    }

"""The associative recall task (Graves et al. 2014, section 4.3).

An item is `item_size` random bit vectors (three six-bit vectors in the paper). K items are
presented, each after a step that carries only the item delimiter; then a query delimiter,
one of the first K-1 items again, a second query delimiter, and `item_size` blank steps
during which the model must output the item that followed the queried one. Inputs have
`bits + 2` channels (the bits, the item delimiter, the query delimiter), outputs `bits`; only
the answer is scored. The items of one sequence are distinct, so the answer is unique.

A DNC solves it with the two mechanisms that set it apart from the NTM: it writes the items
to rows in order by allocation (recording that order in its temporal links), finds the
queried item by content and steps forward through the links to the item written after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from models.tasks.bits import BitTask, bit_errors, bit_loss, evaluate_bits

__all__ = [
    "RecallBatch", "RecallTask", "bit_errors", "bit_loss", "check_recall_arguments",
    "evaluate_recall", "recall_batch", "recall_steps",
]  # fmt: skip

# Seeds the validation set; training batches come from generators seeded by (seed, step).
VALIDATION_SEED = 3_141_592_653


@dataclass
class RecallBatch:
    """Inputs `[B, T, bits+2]`, targets and mask `[B, T, bits]` (mask 1 where scored).

    `items[b]` is the number of items of sequence b, `queries[b]` the index of its queried
    item (its answer is item `queries[b] + 1`).
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    items: Tensor  # [B] int64
    queries: Tensor  # [B] int64

    def to(self, device: torch.device | str) -> RecallBatch:
        tensors = (self.inputs, self.targets, self.mask, self.items, self.queries)
        return RecallBatch(*(t.to(device) for t in tensors))


def recall_steps(items: int, item_size: int) -> int:
    """Steps of a sequence of `items` items: each with its delimiter, then the query with its
    two delimiters, then the answer."""
    return items * (item_size + 1) + 2 * item_size + 2


def check_recall_arguments(min_items: int, max_items: int, bits: int, item_size: int) -> None:
    """Raise ValueError, naming the argument, unless sequences of these sizes can be drawn."""
    if bits < 1 or item_size < 1:
        raise ValueError(f"recall needs bits >= 1 and item size >= 1, got {bits}, {item_size}")
    if not 2 <= min_items <= max_items:
        raise ValueError(f"recall item counts need 2 <= min <= max, got {min_items}..{max_items}")
    if 2 ** (bits * item_size) < max_items:
        raise ValueError(
            f"{max_items} distinct items need more than {bits * item_size} bits per item "
            f"(bits {bits} x item size {item_size})"
        )


def _distinct_items(
    batch: int, items: int, bits: int, item_size: int, generator: torch.Generator
) -> Tensor:
    """Random items `[batch, items, item_size, bits]`, distinct within each sequence.

    An item equal to an earlier one of its sequence is drawn again until it differs; with
    the paper's 2^18 possible items that is almost never needed.
    """
    vectors = torch.randint(0, 2, (batch, items, item_size, bits), generator=generator).float()
    flat = vectors.view(batch, items, item_size * bits)
    for k in range(1, items):
        while True:
            repeated = (flat[:, k : k + 1] == flat[:, :k]).all(dim=-1).any(dim=-1)
            count = int(repeated.sum())
            if count == 0:
                break
            redrawn = torch.randint(0, 2, (count, item_size * bits), generator=generator)
            flat[repeated, k] = redrawn.float()
    return vectors


def recall_batch(
    batch: int,
    min_items: int,
    max_items: int,
    generator: torch.Generator,
    bits: int = 6,
    item_size: int = 3,
) -> RecallBatch:
    """`batch` sequences with item counts uniform in `min_items..max_items`, padded to the
    longest; the queried item is uniform over the items that have a successor.

    Sequence b occupies steps 0..recall_steps(K_b)-1; after that its inputs are blank and
    nothing is scored, so sequences of different lengths share a batch without changing
    each other's task.
    """
    check_recall_arguments(min_items, max_items, bits, item_size)
    counts = torch.randint(min_items, max_items + 1, (batch,), generator=generator)
    # the query is uniform over 0..K_b-2: scale a uniform draw, as randint takes one range
    queries = (torch.rand(batch, generator=generator) * (counts - 1)).long()
    most = int(counts.max())
    vectors = _distinct_items(batch, most, bits, item_size, generator)
    steps = recall_steps(most, item_size)
    inputs = torch.zeros(batch, steps, bits + 2)
    targets = torch.zeros(batch, steps, bits)
    mask = torch.zeros(batch, steps, bits)
    item_delimiter, query_delimiter = bits, bits + 1
    for b, (count, query) in enumerate(zip(counts.tolist(), queries.tolist(), strict=True)):
        for k in range(count):
            start = k * (item_size + 1)
            inputs[b, start, item_delimiter] = 1.0
            inputs[b, start + 1 : start + 1 + item_size, :bits] = vectors[b, k]
        start = count * (item_size + 1)
        inputs[b, start, query_delimiter] = 1.0
        inputs[b, start + 1 : start + 1 + item_size, :bits] = vectors[b, query]
        inputs[b, start + 1 + item_size, query_delimiter] = 1.0
        answer = start + 2 + item_size
        targets[b, answer : answer + item_size] = vectors[b, query + 1]
        mask[b, answer : answer + item_size] = 1.0
    return RecallBatch(inputs, targets, mask, counts, queries)


@dataclass(frozen=True)
class RecallTask(BitTask):
    """Training batches for associative recall: one item count per batch, uniform in the range.

    One count per batch keeps every step of a batch useful (no padding); across batches the
    counts are uniform in `min_items..max_items` (2..6 in the paper).
    """

    batch_size: int
    min_items: int = 2
    max_items: int = 6
    bits: int = 6
    item_size: int = 3
    name: str = "recall"
    validation_seed: ClassVar[int] = VALIDATION_SEED

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        check_recall_arguments(self.min_items, self.max_items, self.bits, self.item_size)

    def size_range(self) -> tuple[int, int]:
        return self.min_items, self.max_items

    def draw(self, count: int, size: int, generator: torch.Generator) -> RecallBatch:
        return recall_batch(count, size, size, generator, self.bits, self.item_size)


def evaluate_recall(
    model: torch.nn.Module,
    items: int,
    samples: int,
    generator: torch.Generator,
    bits: int = 6,
    item_size: int = 3,
    chunk: int = 250,
) -> dict[str, float]:
    """Bit errors per sequence of `samples` fresh sequences of `items` items each.

    Returns the mean, the standard error of the mean, the worst sequence and the fraction
    answered without a single wrong bit.
    """
    draw = lambda count: recall_batch(count, items, items, generator, bits, item_size)  # noqa: E731
    return {"items": items, **evaluate_bits(model, draw, samples, chunk)}

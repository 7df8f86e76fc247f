"""The associative recall task's batches and scores, checked against sequences built by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from models.tasks.recall import (
    RecallBatch,
    RecallTask,
    bit_errors,
    bit_loss,
    evaluate_recall,
    recall_batch,
    recall_steps,
)


def test_the_smallest_sequences_are_the_ones_written_by_hand(generator: torch.Generator) -> None:
    """One bit per item, two items: the items are 0 and 1 in some order, item 0 is queried."""
    batch = recall_batch(8, 2, 2, generator, bits=1, item_size=1)
    item_mark, query_mark = [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]  # the two delimiter steps
    for b in range(8):
        first = float(batch.inputs[b, 1, 0])
        second = 1.0 - first
        expected = [
            item_mark, [first, 0, 0], item_mark, [second, 0, 0],
            query_mark, [first, 0, 0], query_mark, [0, 0, 0],
        ]  # fmt: skip
        assert batch.inputs[b].tolist() == expected
        assert batch.targets[b].tolist() == [[0]] * 7 + [[second]]
        assert batch.mask[b].tolist() == [[0]] * 7 + [[1]]
    assert batch.items.tolist() == [2] * 8 and batch.queries.tolist() == [0] * 8


def expected_batch(
    items: list[list[Tensor]], queries: list[int], bits: int, item_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs, targets and mask of sequences laid out step by step from their items."""
    steps = recall_steps(max(len(sequence) for sequence in items), item_size)
    inputs = torch.zeros(len(items), steps, bits + 2)
    targets = torch.zeros(len(items), steps, bits)
    mask = torch.zeros(len(items), steps, bits)
    for b, (sequence, query) in enumerate(zip(items, queries, strict=True)):
        t = 0
        for item in sequence:
            inputs[b, t, bits] = 1  # the item delimiter, alone on its step
            t += 1
            for vector in item:
                inputs[b, t, :bits] = vector
                t += 1
        inputs[b, t, bits + 1] = 1  # the query delimiter before the query ...
        t += 1
        for vector in sequence[query]:
            inputs[b, t, :bits] = vector
            t += 1
        inputs[b, t, bits + 1] = 1  # ... and after it
        t += 1
        for vector in sequence[query + 1]:
            targets[b, t] = vector
            mask[b, t] = 1
            t += 1
    return inputs, targets, mask


def test_batches_follow_the_paper_layout(generator: torch.Generator) -> None:
    bits, item_size = 6, 3
    batch = recall_batch(16, 2, 9, generator, bits, item_size)
    most = int(batch.items.max())
    assert batch.inputs.shape == (16, recall_steps(most, item_size), bits + 2)
    assert batch.targets.shape == batch.mask.shape == (16, recall_steps(most, item_size), bits)
    assert recall_steps(6, 3) == 32  # 6 items of 1 + 3 steps, 2 + 3 for the query, 3 to answer
    items = []
    for b in range(16):
        count, query = int(batch.items[b]), int(batch.queries[b])
        assert 2 <= count <= 9 and 0 <= query <= count - 2
        # the items as the batch presents them: each after its delimiter step
        sequence = [
            batch.inputs[b, k * (item_size + 1) + 1 : (k + 1) * (item_size + 1), :bits]
            for k in range(count)
        ]
        assert set(torch.unique(torch.cat(sequence)).tolist()) <= {0.0, 1.0}
        assert len({tuple(item.flatten().tolist()) for item in sequence}) == count  # distinct
        items.append(sequence)
    inputs, targets, mask = expected_batch(items, batch.queries.tolist(), bits, item_size)
    assert torch.equal(batch.inputs, inputs)
    assert torch.equal(batch.targets, targets)
    assert torch.equal(batch.mask, mask)


def test_items_are_distinct_even_when_every_possible_item_is_needed(
    generator: torch.Generator,
) -> None:
    """Two one-bit vectors per item make four possible items; four items use them all."""
    batch = recall_batch(32, 4, 4, generator, bits=1, item_size=2)
    for b in range(32):
        items = {tuple(batch.inputs[b, 3 * k + 1 : 3 * k + 3, 0].tolist()) for k in range(4)}
        assert items == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_queries_cover_every_item_with_a_successor(generator: torch.Generator) -> None:
    batch = recall_batch(2000, 5, 5, generator)
    counts = torch.bincount(batch.queries, minlength=5).tolist()
    assert counts[4] == 0  # the last item has no successor to answer with
    assert all(300 < count < 700 for count in counts[:4])  # uniform: 500 each


class Oracle(nn.Module):
    """Finds the queried item by content and answers with the next one; `invert` gets every
    bit wrong. Works sequence by sequence, so batches of mixed item counts are fine."""

    def __init__(self, bits: int, item_size: int, invert: bool = False) -> None:
        super().__init__()
        self.bits, self.item_size, self.sign = bits, item_size, -1.0 if invert else 1.0
        self.unused = nn.Parameter(torch.zeros(1))  # evaluate_recall asks for a device

    def forward(self, inputs: Tensor, activate: bool = True) -> Tensor:
        bits, size = self.bits, self.item_size
        outputs = torch.zeros(*inputs.shape[:2], bits)
        for b, sequence in enumerate(inputs):
            query_start = int(torch.nonzero(sequence[:, bits + 1])[0])
            query = sequence[query_start + 1 : query_start + 1 + size, :bits]
            items = sequence[:query_start, :bits].reshape(-1, size + 1, bits)[:, 1:]
            match = int(torch.nonzero((items == query).flatten(1).all(dim=1))[0])
            answer = query_start + size + 2
            outputs[b, answer : answer + size] = items[match + 1]
        return self.sign * (2 * outputs - 1) * 10


@pytest.mark.parametrize("items", [2, 7])
def test_scores_count_wrong_bits_in_the_answer_only(items: int, generator: torch.Generator) -> None:
    bits, size = 6, 3
    perfect = evaluate_recall(Oracle(bits, size), items, 30, generator, bits, size, chunk=7)
    assert perfect["mean_bit_errors"] == 0 and perfect["perfect_fraction"] == 1
    assert perfect["items"] == items and perfect["samples"] == 30
    wrong = evaluate_recall(Oracle(bits, size, invert=True), items, 30, generator, bits, size)
    assert wrong["mean_bit_errors"] == wrong["max_bit_errors"] == bits * size
    assert wrong["perfect_fraction"] == 0 and wrong["standard_error"] == 0


def test_bit_errors_ignore_unscored_steps(generator: torch.Generator) -> None:
    batch = recall_batch(4, 2, 5, generator, bits=4, item_size=2)
    logits = Oracle(4, 2)(batch.inputs)
    assert torch.equal(bit_errors(logits, batch), torch.zeros(4))
    logits[batch.mask == 0] *= -1  # wrong everywhere but the answers: not scored
    assert torch.equal(bit_errors(logits, batch), torch.zeros(4))
    answer = (batch.inputs[:, :, 5] == 1).long().cumsum(1).eq(2).long().argmax(1) + 1
    logits[1, answer[1], 2] *= -1
    logits[3, answer[3] + 1, :3] *= -1
    assert bit_errors(logits, batch).tolist() == [0, 1, 0, 3]
    assert isinstance(batch, RecallBatch)


def test_the_task_scores_an_oracle_perfect(generator: torch.Generator) -> None:
    task = RecallTask(batch_size=8, min_items=2, max_items=5, bits=4, item_size=2)
    loss, metrics = task.loss(Oracle(4, 2), generator, torch.device("cpu"))
    assert metrics == {"bit_errors": 0.0} and 0 < float(loss) < 1e-3
    scores = task.validate(Oracle(4, 2), torch.device("cpu"))
    assert list(scores) == ["bit_errors", "loss"] and scores["bit_errors"] == 0
    assert scores == task.validate(Oracle(4, 2), torch.device("cpu"))  # a fixed set
    wrong = task.validate(Oracle(4, 2, invert=True), torch.device("cpu"))
    assert wrong["bit_errors"] == 8 and wrong["loss"] > 9
    batch = recall_batch(3, 3, 3, generator, 4, 2)
    assert float(bit_loss(Oracle(4, 2, invert=True)(batch.inputs), batch)) == pytest.approx(
        10, abs=1e-3
    )


def test_invalid_arguments_are_refused(generator: torch.Generator) -> None:
    with pytest.raises(ValueError, match="2 <= min <= max"):
        recall_batch(2, 1, 3, generator)
    with pytest.raises(ValueError, match="2 <= min <= max"):
        recall_batch(2, 5, 3, generator)
    with pytest.raises(ValueError, match="bits >= 1 and item size >= 1"):
        recall_batch(2, 2, 3, generator, bits=0)
    with pytest.raises(ValueError, match="bits >= 1 and item size >= 1"):
        recall_batch(2, 2, 3, generator, item_size=0)
    with pytest.raises(ValueError, match="5 distinct items need more than 2 bits per item"):
        recall_batch(2, 2, 5, generator, bits=1, item_size=2)
    with pytest.raises(ValueError, match="2 <= min <= max"):
        RecallTask(batch_size=4, min_items=1)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        RecallTask(batch_size=0)
    with pytest.raises(ValueError, match="samples and chunk must be >= 1"):
        evaluate_recall(Oracle(6, 3), 3, 0, generator)

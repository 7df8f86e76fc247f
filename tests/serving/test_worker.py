"""The worker's side of the pipe, in this process: a launch parks, restores and steps in
that order; its one slot check refuses a launch before it changes anything; the model card
says what the model is."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from kernels.backend import BACKEND_ENV
from models import checkpoint
from models.base import MemoryModel
from models.state import StatePool
from protos import journal_pb2, tensors
from serving import worker
from serving.durable.records import operation_record, replay_row
from serving.protocol import (
    Close,
    Launch,
    ModelCard,
    Operation,
    ReadSlot,
    Replay,
    ResetSlot,
    StepBatch,
    WriteSlot,
    frame,
    steps_of,
)
from serving.worker import answer, describe, host_state, run_launch, warm_up


@pytest.fixture(autouse=True)
def torch_backend() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


@pytest.fixture(scope="module")
def model() -> MemoryModel:
    return checkpoint.load("ntm-copy")


def stepped_pool(model: MemoryModel, capacity: int, steps: int) -> StatePool:
    """A pool whose sessions have taken `steps` random steps each (no two alike)."""
    pool = model.new_pool(capacity)
    model.reset(pool, range(capacity))
    rng = np.random.default_rng(capacity)
    for _ in range(steps):
        inputs = torch.from_numpy(rng.random((capacity, model.input_size), dtype=np.float32))
        model.step(pool, torch.arange(capacity), inputs)
    return pool


def test_a_launch_parks_then_restores_then_steps(model: MemoryModel) -> None:
    pool = stepped_pool(model, 3, steps=4)
    before = {slot: pool.read(slot) for slot in range(3)}
    elsewhere = stepped_pool(model, 1, steps=7).read(0)  # a parked session's state
    inputs = np.random.default_rng().random((2, model.input_size), dtype=np.float32)
    launch = Launch(
        batches=(StepBatch.of(np.array([1, 2]), [row[None] for row in inputs]),),
        park=(1,),
        restore=((1, host_state(elsewhere)),),
    )
    landed = run_launch(model, pool, launch)
    # the parked state is slot 1's as it was, read before anything was written there
    for name, array in landed.parked[0].items():
        assert np.array_equal(array, before[1][name].numpy())
    # the step ran on the restored state: the same as stepping that state alone
    alone = model.new_pool(1)
    alone.write(0, elsewhere)
    expected = model.step(alone, torch.tensor([0]), torch.from_numpy(inputs[:1]))
    assert np.array_equal(landed.outputs[Operation.STEP][0, 0], expected[0].numpy())
    for name in pool:
        assert torch.equal(pool.read(1)[name], alone.read(0)[name])
        assert torch.equal(pool.read(0)[name], before[0][name])  # not in the launch
    assert landed.seconds > 0


@pytest.mark.parametrize("slots", [[0, 0], [0, 3], [-1, 1]], ids=["twice", "outside", "padding"])
def test_a_launch_with_bad_slots_is_refused_before_anything_changes(
    model: MemoryModel, slots: list[int]
) -> None:
    pool = stepped_pool(model, 3, steps=2)
    before = {slot: pool.read(slot) for slot in range(3)}
    inputs = np.random.default_rng().random((2, model.input_size), dtype=np.float32)
    launch = Launch(
        batches=(StepBatch.of(np.array(slots, np.int64), [row[None] for row in inputs]),),
        park=(2,),
        restore=((2, host_state(before[0])),),
    )
    with pytest.raises(ValueError, match="slot"):
        run_launch(model, pool, launch)
    for slot in range(3):
        for name in pool:
            assert torch.equal(pool.read(slot)[name], before[slot][name])


def test_slot_requests_reset_read_and_write(model: MemoryModel) -> None:
    pool = stepped_pool(model, 2, steps=3)
    scratch = model.new_pool(1)
    stepped = pool.read(1)
    answer(model, pool, scratch, ResetSlot(1))
    fresh = answer(model, pool, scratch, ReadSlot(1))
    for name, array in fresh.items():
        assert np.array_equal(array, model.initial_state()[name].numpy())
    answer(model, pool, scratch, WriteSlot(0, host_state(stepped)))
    for name in pool:
        assert torch.equal(pool.read(0)[name], stepped[name])


@pytest.mark.parametrize("name", ["ntm-copy", "vmed-chat"])
def test_the_card_says_what_the_model_is(name: str) -> None:
    model = checkpoint.load(name)
    card = describe(model, "torch", torch.device("cpu"))
    directory = checkpoint.resolve(name)
    digest = hashlib.sha256((directory / checkpoint.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert card.weights_digest == digest
    assert (card.input_size, card.output_size) == (model.input_size, model.output_size)
    assert card.state_specs == model.state_specs() and card.state_bytes == model.state_bytes
    assert card.memory_shape == model.memory_shape
    for spec in card.state_specs:
        assert np.array_equal(card.initial_state[spec.name], model.initial_state()[spec.name])
    assert card.text_operations == (name == "vmed-chat")
    assert card.device == "cpu"
    assert (card.tokenizer_json is not None) == (name == "vmed-chat")


@pytest.mark.parametrize("name", ["ntm-copy", "dnc-recall", "vmed-chat"])
def test_the_warm_up_runs_each_operation_the_model_serves(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kernels compile on their first call: the warm-up makes that call, on the scratch slot,
    # before the server hears that the model is ready.
    model = checkpoint.load(name)
    card = describe(model, "torch", torch.device("cpu"))
    operations = ["step", *(["encode", "begin_reply", "decode"] if card.text_operations else [])]
    calls: list[str] = []
    for operation in operations:
        monkeypatch.setattr(model, operation, counting(calls, operation, getattr(model, operation)))
    warm_up(model, model.new_pool(1), card)
    assert sorted(calls) == sorted(operations)


def test_the_worker_warms_up_before_it_sends_its_card(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's main, in this process over a real pipe (told to stop before it starts):
    its warm-up runs before the card reaches the server's end, so the first launch, which
    the server sends once it has the card, finds the kernels built."""
    server_end, worker_end = multiprocessing.Pipe()
    card_already_sent: list[bool] = []

    def watched(model: MemoryModel, scratch: StatePool, card: ModelCard) -> None:
        card_already_sent.append(server_end.poll())
        warm_up(model, scratch, card)

    monkeypatch.setattr(worker, "warm_up", watched)
    with socket.socket(fileno=os.dup(server_end.fileno())) as requests:
        requests.sendall(b"".join(frame(Close())))  # read once the worker has sent its card
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.serve(worker_end, str(checkpoint.resolve("ntm-copy")), "cpu", 2, 0, 0)
    finally:
        for number, handler in handlers.items():  # `serve` ignores them, as a worker does
            signal.signal(number, handler)
    assert card_already_sent == [False]
    reply = server_end.recv()
    assert reply.ok and isinstance(reply.value, ModelCard)


def counting(calls: list[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return method(*args, **kwargs)

    return counted


@pytest.mark.parametrize("counts", [(3, 2, 1), (3, 3, 3)], ids=["padded", "full"])
@pytest.mark.parametrize("name", ["ntm-copy", "dnc-recall"])
def test_a_multi_step_launch_is_each_session_stepped_alone(
    name: str, counts: tuple[int, ...]
) -> None:
    """Rows of 3, 2 and 1 steps (or 3 each) in one launch: every output and state is, bit for
    bit, that of the session stepped alone one step at a time; outputs past a row's steps
    are zeros."""
    model = checkpoint.load(name)
    pool = stepped_pool(model, 4, steps=2)
    before = {slot: pool.read(slot) for slot in range(4)}
    rng = np.random.default_rng(7)
    inputs = [rng.random((steps, model.input_size), dtype=np.float32) for steps in counts]
    slots = np.array([2, 0, 3], np.int64)
    landed = run_launch(model, pool, Launch(batches=(StepBatch.of(slots, inputs),)))
    outputs = landed.outputs[Operation.STEP]
    assert outputs.shape == (3, 3, model.output_size)
    for row, (slot, rows) in enumerate(zip(slots, inputs, strict=True)):
        alone = model.new_pool(1)
        alone.write(0, before[int(slot)])
        for k, step_inputs in enumerate(rows):
            expected = model.step(alone, torch.tensor([0]), torch.from_numpy(step_inputs[None]))
            assert np.array_equal(outputs[row, k], expected[0].numpy())
        assert not outputs[row, len(rows) :].any()
        for state in pool:
            assert torch.equal(pool.read(int(slot))[state], alone.read(0)[state])
    for state in pool:  # slot 1 was not in the launch
        assert torch.equal(pool.read(1)[state], before[1][state])


@pytest.mark.parametrize(
    "counts", [[1, 2], [2, 0], [3, 1]], ids=["rising", "no step", "more than K"]
)
def test_a_step_batch_with_wrong_counts_is_refused(model: MemoryModel, counts: list[int]) -> None:
    pool = stepped_pool(model, 2, steps=1)
    before = {slot: pool.read(slot) for slot in range(2)}
    inputs = np.zeros((2, 2, model.input_size), np.float32)  # K = 2
    batch = StepBatch(np.array([0, 1]), inputs, np.array(counts))
    with pytest.raises(ValueError, match="non-increasing"):
        run_launch(model, pool, Launch(batches=(batch,)))
    for slot in range(2):
        for name in pool:
            assert torch.equal(pool.read(slot)[name], before[slot][name])


def test_stored_steps_replay_to_the_same_bits_in_either_record_form(model: MemoryModel) -> None:
    """A call's steps are stored as rows of k steps (one record for a launch row) or, in
    stores written before, one record per step; both replay to the state of the same steps
    taken one launch at a time, bit for bit, and count the same steps."""
    rng = np.random.default_rng(3)
    inputs = rng.random((7, model.input_size), dtype=np.float32)
    pool = model.new_pool(1)
    model.reset(pool, [0])
    for row in inputs:
        model.step(pool, torch.zeros(1, dtype=torch.long), torch.from_numpy(row[None]))
    expected = host_state(pool.read(0))
    as_rows = [operation_record(Operation.STEP, part) for part in (inputs[:3], inputs[3:])]
    per_step = [journal_pb2.Operation(step=tensors.encode(row)) for row in inputs]
    for records in (as_rows, per_step, [*per_step[:3], *as_rows[1:]]):
        rows = tuple(replay_row(record) for record in records)
        assert steps_of(rows) == 7
        replayed = answer(model, model.new_pool(1), model.new_pool(1), Replay(None, rows))
        for name, array in expected.items():
            assert np.array_equal(replayed[name], array), name

"""A session's outputs and state do not depend on which sessions share its launch.

Every bundled model's serving operations, run for 13 sessions through launches of random
sizes in shuffled order with padding rows mixed in, give each session the same bits, outputs
and state, as running it alone; and the worker's trusted path (`check=False`, no padding)
gives the same bits as the checked one. On the PyTorch backend, which serves on CPUs (the
Triton kernels run one program per row, so a row cannot see the others).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from kernels.backend import BACKEND_ENV
from models import checkpoint
from models.base import MemoryModel
from models.state import StatePool

SESSIONS = 13
ROUNDS = 4

# An operation over a launch: (model, pool, slots, per-row inputs, check) -> outputs or None.
Operation = Callable[[MemoryModel, StatePool, Tensor, list[Tensor], bool], Tensor | None]


def step(
    model: MemoryModel, pool: StatePool, slots: Tensor, rows: list[Tensor], check: bool
) -> Tensor:
    return model.step(pool, slots, rows[0], check=check)


def encode(
    model: MemoryModel, pool: StatePool, slots: Tensor, rows: list[Tensor], check: bool
) -> None:
    text_model: Any = model
    text_model.encode(pool, slots, rows[0], check=check)


def begin(
    model: MemoryModel, pool: StatePool, slots: Tensor, rows: list[Tensor], check: bool
) -> None:
    text_model: Any = model
    text_model.begin_reply(pool, slots, rows[0], rows[1], check=check)


def decode(
    model: MemoryModel, pool: StatePool, slots: Tensor, rows: list[Tensor], check: bool
) -> Tensor:
    text_model: Any = model
    logits: Tensor = text_model.decode(pool, slots, rows[0], check=check)
    return logits


def row_inputs(model: MemoryModel, name: str, rng: np.random.Generator) -> list[Tensor]:
    """One session's inputs for one operation, each with a leading row dimension of 1."""
    if name == "step":
        return [torch.from_numpy(rng.random((1, model.input_size), dtype=np.float32))]
    vocab = model.output_size
    if name in ("encode", "decode"):
        return [torch.from_numpy(rng.integers(0, vocab, 1))]
    latent = next(s.shape[0] for s in model.state_specs() if s.name == "z")
    noise = torch.from_numpy(rng.standard_normal((1, latent)).astype(np.float32))
    return [noise, torch.from_numpy(rng.random(1, dtype=np.float32))]


# (model, operations run in order each round)
CASES = [
    ("ntm-copy", ["step"]),
    ("dnc-recall", ["step"]),
    ("vmed-chat", ["encode", "encode", "begin", "decode", "step"]),
]
OPERATIONS: dict[str, Operation] = {
    "step": step,
    "encode": encode,
    "begin": begin,
    "decode": decode,
}


@pytest.fixture(autouse=True)
def torch_backend() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


@pytest.mark.parametrize(("name", "operations"), CASES, ids=[c[0] for c in CASES])
def test_each_session_gets_the_bits_it_gets_alone(name: str, operations: list[str]) -> None:
    model = checkpoint.load(name)
    rng = np.random.default_rng()
    alone = model.new_pool(SESSIONS)
    model.reset(alone, range(SESSIONS))
    shared = model.new_pool(SESSIONS + 5)
    home = rng.permutation(SESSIONS + 5)[:SESSIONS]  # session s lives in shared slot home[s]
    model.reset(shared, [int(slot) for slot in home])
    for _ in range(ROUNDS):
        for operation_name in operations:
            operation = OPERATIONS[operation_name]
            inputs = [row_inputs(model, operation_name, rng) for _ in range(SESSIONS)]
            expected = [
                operation(model, alone, torch.tensor([s]), inputs[s], True) for s in range(SESSIONS)
            ]
            order = rng.permutation(SESSIONS)
            cuts = sorted(rng.choice(np.arange(1, SESSIONS), rng.integers(0, 4), replace=False))
            for launch in np.split(order, cuts):
                padding = int(rng.integers(0, 3))
                slots = [int(home[s]) for s in launch] + [-1] * padding
                rows = [*launch, *rng.integers(0, SESSIONS, padding)]  # padding rows: any inputs
                shuffle = rng.permutation(len(slots))
                slots, rows = [slots[i] for i in shuffle], [rows[i] for i in shuffle]
                batched = [torch.cat([inputs[r][k] for r in rows]) for k in range(len(inputs[0]))]
                got = operation(model, shared, torch.tensor(slots), batched, True)
                for position, (slot, session) in enumerate(zip(slots, rows, strict=True)):
                    if got is None:
                        continue
                    if slot < 0:
                        assert not got[position].any(), "a padding row got outputs"
                    else:
                        want = expected[session]
                        assert want is not None
                        assert torch.equal(got[position], want[0]), (operation_name, session)
    for session in range(SESSIONS):
        mine, reference = shared.read(int(home[session])), alone.read(session)
        for tensor in mine:
            assert torch.equal(mine[tensor], reference[tensor]), (session, tensor)


@pytest.mark.parametrize(("name", "operations"), CASES, ids=[c[0] for c in CASES])
def test_the_trusted_path_gives_the_checked_bits(name: str, operations: list[str]) -> None:
    model = checkpoint.load(name)
    rng = np.random.default_rng()
    pools = {check: model.new_pool(SESSIONS) for check in (True, False)}
    slots = torch.from_numpy(rng.permutation(SESSIONS))
    for pool in pools.values():
        model.reset(pool, range(SESSIONS))
    for operation_name in operations * 2:
        inputs = [row_inputs(model, operation_name, rng) for _ in range(SESSIONS)]
        batched = [torch.cat([row[k] for row in inputs]) for k in range(len(inputs[0]))]
        results = {
            check: OPERATIONS[operation_name](model, pool, slots, batched, check)
            for check, pool in pools.items()
        }
        checked, trusted = results[True], results[False]
        if checked is not None:
            assert trusted is not None and torch.equal(checked, trusted)
    for tensor in pools[True]:
        assert torch.equal(pools[True][tensor], pools[False][tensor]), tensor

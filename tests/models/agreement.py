"""The check every served model must pass: its training forward and its serving step agree."""

from __future__ import annotations

import torch

from models.base import MemoryModel
from models.controller import ControllerMemoryModel
from models.state import StatePool
from models.tasks.bits import BitBatch, bit_errors
from tests.conftest import relative_error


def randomize(model: ControllerMemoryModel, generator: torch.Generator) -> None:
    """Random initial reads, controller state and memory, and an interface layer strong
    enough that addressing is sharp rather than near-uniform."""
    with torch.no_grad():
        model.interface.weight.mul_(4)
        for parameter in (model.initial_reads, model.initial_h, model.initial_c):
            parameter.normal_(generator=generator)
        model.initial_memory.normal_(generator=generator)  # type: ignore[operator]


def fill_random(pool: StatePool, generator: torch.Generator) -> None:
    for name in pool:
        pool[name].copy_(torch.randn(pool[name].shape, generator=generator))


# Two rows' usages closer than this (a few float32 ulps of 1) are a tie that rounding decides.
TIE = 1e-6
# The paths agree where the relative error stays under AGREE; a served row's error at one
# step sits under NOISE (a few float32 ulps) until it parts.
AGREE = 1e-5
NOISE = 1e-6


def assert_forward_and_step_agree(
    model: MemoryModel, steps: int, generator: torch.Generator, tries: int = 3
) -> None:
    """On the model's device (the compiled kernels on CUDA), with the same weights and
    inputs: the sequence forward (reference pieces, autograd graph) and `steps` serving
    steps on a pool give the same outputs (relative error < AGREE), padding rows give
    zeros, and the pool slots outside the batch stay bit-identical.

    The DNC's allocation is discontinuous where two rows' usages tie: the rows swap places
    in the usage order and the allocation moves from one to the other. Each session is
    judged on its own: where a session's served usage ties (within TIE) at a step between
    the one its output leaves float noise and the one it parts, float32 rounding that
    differs between the paths by an ulp decided which row was written: that draw of inputs
    is drawn again (at most `tries` draws). A session that parts anywhere else fails at
    once."""
    for _ in range(tries):
        if _agree_or_tie(model, steps, generator):
            return
    raise AssertionError(f"{tries} draws in a row parted at a usage tie")


def _agree_or_tie(model: MemoryModel, steps: int, generator: torch.Generator) -> bool:
    """True where the paths agree, False where they part at a usage tie (else raises)."""
    device = model.device
    slots = torch.tensor([4, -1, 0, 2], device=device)
    live = slots >= 0
    inputs = torch.randn(int(live.sum()), steps, model.input_size, generator=generator).to(device)
    with torch.no_grad():
        expected = model(inputs)

    pool = model.new_pool(6)
    fill_random(pool, generator)
    model.reset(pool, slots[live].tolist())
    untouched = {name: pool[name][[1, 3, 5]].clone() for name in pool}
    outputs, gaps = [], []
    for t in range(steps):
        step_inputs = torch.randn(len(slots), model.input_size, generator=generator).to(device)
        step_inputs[live] = inputs[:, t]
        out = model.step(pool, slots, step_inputs)
        assert torch.equal(out[~live], torch.zeros_like(out[~live]))
        outputs.append(out[live])
        gaps.append(_usage_gaps(pool, slots[live]))
    for name in pool:
        assert torch.equal(pool[name][[1, 3, 5]], untouched[name])
    served = torch.stack(outputs, dim=1)
    if relative_error(served, expected) < AGREE:
        return True
    for row in range(served.shape[0]):
        errors = [relative_error(served[row, t], expected[row, t]) for t in range(steps)]
        parted = next((t for t in range(steps) if errors[t] >= AGREE), None)
        if parted is None:
            continue
        # Where the swap moves little weight the row leaves float noise a step or two before
        # its error passes AGREE: the tie is looked for from the step it left the noise.
        left = parted
        while left > 0 and errors[left - 1] >= NOISE:
            left -= 1
        closest = min(gaps[t][row] for t in range(left, parted + 1))
        assert closest < TIE, (
            f"row {row} parts from the forward at step {parted} (relative error "
            f"{errors[parted]:.2e}, above float noise from step {left}), where none of its "
            f"usages tie (closest {closest:.1e})"
        )
    return False


def _usage_gaps(pool: StatePool, slots: torch.Tensor) -> list[float]:
    """For each of `slots`, the least difference between two of its rows' usages (inf for a
    model without usage)."""
    if "usage" not in pool.tensors:
        return [float("inf")] * len(slots)
    usage = pool["usage"][slots].double()
    apart = (usage.unsqueeze(-1) - usage.unsqueeze(-2)).abs()
    apart += torch.eye(usage.shape[-1], dtype=apart.dtype, device=apart.device) * 2
    return apart.flatten(1).min(dim=1).values.tolist()


def assert_served_like_forward(
    model: MemoryModel, batch: BitBatch, generator: torch.Generator
) -> None:
    """Sessions of mixed lengths in random slots of one pool, stepped together one time step
    per call as on a server, get exactly the bit errors the training forward gets."""
    sessions = batch.inputs.shape[0]
    pool = model.new_pool(sessions + 2)
    slots = torch.randperm(sessions + 2, generator=generator)[:sessions]
    model.reset(pool, slots.tolist())
    steps = [model.step(pool, slots, batch.inputs[:, t]) for t in range(batch.inputs.shape[1])]
    served = torch.logit(torch.stack(steps, dim=1).clamp(1e-7, 1 - 1e-7))
    with torch.no_grad():
        expected = bit_errors(model(batch.inputs, activate=False), batch)
    assert torch.equal(bit_errors(served, batch), expected)

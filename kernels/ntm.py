"""Fused Neural Turing Machine memory step over a pool of session slots.

`ntm_memory_step` performs, for a batch of sessions, the whole NTM memory step of
`kernels.reference.ntm_memory_step` (its specification) in one Triton launch: content
addressing, interpolation, circular shift and sharpening for every head, the reads, and the
erase/add write, updating the memory and weighting pools in place at the given slots.

One program handles one batch row (one session). It runs three phases:

A. content logits: stream the slot's memory rows, compute each head's beta * cosine logits
   and park them in a float32 scratch row `[H, N]` (HBM-backed, but small and hot in L1/L2);
B. addressing: per head, over all N positions at once: softmax, interpolation with the
   previous weighting, circular shift (as 2K+1 shifted loads of that scratch row), sharpening;
   the weighting goes to the pool and, in float32, back to the scratch row;
C. read and write: stream the memory rows again, accumulate the reads and write
   memory * prod(1 - w e^T) + sum(w a^T).

When the whole slot fits on chip (`BLOCK_N` covers N) the memory tile loaded in phase A stays
in registers for phase C, so each addressed slot is read once and written once. Larger slots
(up to N=4096, M=256) tile over N and read the memory twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import reference
from kernels.backend import TRITON_AVAILABLE, select_backend
from kernels.launch import (
    MAX_TILE_ELEMENTS,
    POOL_DTYPES,
    next_power_of_2,
    reads_buffer,
    validate_slots,
)

if TRITON_AVAILABLE:
    from kernels.ntm_triton import ntm_step_kernel

MAX_SHIFT_RADIUS = 3


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time tile sizes and warp count for one memory shape."""

    block_n: int  # rows streamed per tile in phases A and C
    block_m: int  # a whole memory row
    block_nf: int  # every row: phase B holds one head's weighting over all of them
    num_warps: int

    @property
    def one_tile(self) -> bool:
        """Whether the whole slot stays in registers between phases A and C."""
        return self.block_n >= self.block_nf


def launch_config(num_rows: int, row_width: int) -> LaunchConfig:
    """Tiles of at most MAX_TILE_ELEMENTS and about 32 tile elements per thread.

    At most 8 warps: there ptxas for sm_90a keeps every size up to N=4096, M=256 in
    registers without spilling (its counts: docs/performance.md, "Kernels"). Tuning on a
    GPU should replace this guess.
    """
    block_m = next_power_of_2(row_width)
    block_nf = next_power_of_2(num_rows)
    block_n = max(1, min(block_nf, MAX_TILE_ELEMENTS // block_m))
    num_warps = min(8, max(4, block_n * block_m // 1024))
    return LaunchConfig(block_n, block_m, block_nf, num_warps)


def kernel_constants(
    num_rows: int, row_width: int, num_read: int, num_write: int, radius: int, config: LaunchConfig
) -> dict[str, int | bool]:
    """The compile-time constants of `ntm_step_kernel` for one model shape and tiling."""
    return {
        "N": num_rows, "M": row_width, "R": num_read, "W": num_write,
        "R_PAD": next_power_of_2(max(1, num_read)), "K": radius,
        "BLOCK_N": config.block_n, "BLOCK_M": config.block_m, "BLOCK_NF": config.block_nf,
        "ONE_TILE": config.one_tile,
    }  # fmt: skip


def _launch_triton(args: tuple[Tensor, ...], reads: Tensor, config: LaunchConfig | None) -> None:
    """Launch the kernel on validated `ntm_memory_step` arguments, in its order."""
    memory, _, _, keys, _, _, shift, _, erase, _ = args
    batch, num_heads, row_width = keys.shape
    num_rows = memory.shape[1]
    num_write = erase.shape[1]
    num_read = num_heads - num_write
    if batch == 0:
        return
    scratch = torch.empty(batch, num_heads, num_rows, dtype=torch.float32, device=keys.device)
    config = config or launch_config(num_rows, row_width)
    radius = (shift.shape[2] - 1) // 2
    constants = kernel_constants(num_rows, row_width, num_read, num_write, radius, config)
    ntm_step_kernel[(batch,)](*args, reads, scratch, **constants, num_warps=config.num_warps)


def ntm_memory_step(
    memory: Tensor,
    weights: Tensor,
    slots: Tensor,
    keys: Tensor,
    beta: Tensor,
    gate: Tensor,
    shift: Tensor,
    gamma: Tensor,
    erase: Tensor,
    add: Tensor,
    *,
    out: Tensor | None = None,
    check_slots: bool = True,
    config: LaunchConfig | None = None,
) -> Tensor:
    """One NTM memory step for the sessions in `slots`; updates `memory` and `weights` in place.

    memory `[S, N, M]` and weights `[S, R+W, N]` are pools in float32 or bfloat16; slots
    `[B]` int64 (-1 = padding row: reads and writes nothing, returns zeros). Per row, float32:
    keys `[B, R+W, M]`, beta `[B, R+W]` >= 0, gate `[B, R+W]` in [0, 1], shift
    `[B, R+W, 2K+1]` a distribution (K <= 3), gamma `[B, R+W]` >= 1, erase `[B, W, M]` in
    [0, 1], add `[B, W, M]`. Returns float32 reads `[B, R, M]`. See `kernels.reference` for
    the equations. Raises ValueError naming the argument before any state changes; the value
    ranges of the parameters are the caller's contract and are not checked.

    `out`, a float32 `[B, R, M]` tensor, receives the reads instead of a new tensor.
    `check_slots=False` skips the slot range and uniqueness check (a device sync) for callers
    that own the slots. `config` overrides the Triton tiling chosen by `launch_config`.
    """
    validate_ntm_step(
        memory, weights, slots, keys, beta, gate, shift, gamma, erase, add, check_slots
    )
    batch, num_heads, row_width = keys.shape
    reads_shape = (batch, num_heads - erase.shape[1], row_width)
    out = reads_buffer(out, reads_shape, memory.device)
    args = (memory, weights, slots, keys, beta, gate, shift, gamma, erase, add)
    if select_backend(memory.device) == "triton":
        _launch_triton(args, out, config)
    else:
        out.copy_(reference.ntm_memory_step(*args))
    return out


def validate_ntm_step(
    memory: Tensor,
    weights: Tensor,
    slots: Tensor,
    keys: Tensor,
    beta: Tensor,
    gate: Tensor,
    shift: Tensor,
    gamma: Tensor,
    erase: Tensor,
    add: Tensor,
    check_slots: bool = True,
) -> None:
    """Raise ValueError, naming the argument, for anything `ntm_memory_step` cannot run on."""
    for name, pool, rank in (("memory", memory, 3), ("weights", weights, 3)):
        if pool.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(pool.shape)}")
        if pool.dtype not in POOL_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16, got {pool.dtype}")
        if not pool.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    capacity, num_rows, row_width = memory.shape
    if weights.shape[0] != capacity or weights.shape[2] != num_rows:
        raise ValueError(
            f"weights must have shape [{capacity}, R+W, {num_rows}] to match memory "
            f"{tuple(memory.shape)}, got {tuple(weights.shape)}"
        )
    if num_rows == 0 or row_width == 0:
        raise ValueError(f"memory must have N >= 1 and M >= 1, got {tuple(memory.shape)}")
    num_heads = weights.shape[1]
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(
            f"slots must be a 1-D int64 tensor, got {slots.dtype} {tuple(slots.shape)}"
        )
    batch = slots.shape[0]
    if erase.dim() != 3 or erase.shape[1] > num_heads:
        raise ValueError(
            f"erase must have shape [B, W, M] with W <= R+W = {num_heads}, got {tuple(erase.shape)}"
        )
    num_write = erase.shape[1]
    if shift.dim() != 3 or shift.shape[2] % 2 != 1 or shift.shape[2] > 2 * MAX_SHIFT_RADIUS + 1:
        raise ValueError(
            f"shift must have shape [B, R+W, 2K+1] with K in 0..{MAX_SHIFT_RADIUS}, "
            f"got {tuple(shift.shape)}"
        )
    device = memory.device
    for name, tensor, shape in (
        ("keys", keys, (batch, num_heads, row_width)),
        ("beta", beta, (batch, num_heads)),
        ("gate", gate, (batch, num_heads)),
        ("shift", shift, (batch, num_heads, shift.shape[2])),
        ("gamma", gamma, (batch, num_heads)),
        ("erase", erase, (batch, num_write, row_width)),
        ("add", add, (batch, num_write, row_width)),
    ):
        if tensor.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but memory is on {device}")
    for name, tensor in (("weights", weights), ("slots", slots)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but memory is on {device}")
    if check_slots:
        validate_slots(slots, capacity)

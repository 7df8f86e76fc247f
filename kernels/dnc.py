"""Fused Differentiable Neural Computer memory step over a pool of session slots.

`dnc_memory_step` performs, for a batch of sessions, the whole DNC memory step of
`kernels.dnc_reference.dnc_memory_step` (its specification) in one Triton launch, updating
the memory, usage, precedence, link, write-weighting and read-weighting pools in place at the
given slots. One program handles one batch row (one session), in the paper's order:

A. usage: retention psi from the free gates and the previous read weightings, then the new
   usage from the previous write weighting; parked in a float32 scratch row;
B. write content logits: stream the slot's memory rows (strength * cosine with the write key);
C. allocation and write weighting: a[j] = (1 - u[j]) * prod of u[k] over the rows k less used
   than j (u[k] < u[j], ties by index), over tiles of that N x N relation, no sort; the write
   content softmax; w^w = g^w (g^a a + (1 - g^a) c^w);
D. links (only with a link matrix): one pass over L in row blocks: update, store, and use the
   new block at once for the forward weightings of its rows and its share of the backward
   weightings; then the precedence;
E. write and read: stream the rows again: erase/add-write them, the read heads' content
   logits on the written rows, and the reads accumulated with an online softmax, so the
   written rows are not loaded again;
F. read weightings w^r = pi[0] b + pi[1] c^r + pi[2] f into the pool; the reads out.

When the slot's memory fits in one register tile (`BLOCK_ROWS` covers N) the tile loaded in B
stays in registers for E: the memory is read once and written once, the link matrix read once
and written once. See docs/kernels.md for the byte counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import dnc_reference
from kernels.backend import TRITON_AVAILABLE, select_backend
from kernels.launch import (
    MAX_TILE_ELEMENTS,
    POOL_DTYPES,
    next_power_of_2,
    reads_buffer,
    validate_slots,
)

if TRITON_AVAILABLE:
    from kernels.dnc_triton import dnc_step_kernel

NUM_READ_MODES = 3  # backward, content, forward


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time tile sizes and warp count for one DNC shape."""

    block_rows: int  # memory rows per tile in phases B and E
    block_w: int  # a whole memory row
    block_n: int  # every row: one weighting over all of them
    block_link: int  # rows per block of the N x N link matrix and allocation relation
    num_warps: int

    @property
    def one_tile(self) -> bool:
        """Whether the whole slot's memory stays in registers between phases B and E."""
        return self.block_rows >= self.block_n


def launch_config(num_rows: int, word_size: int) -> LaunchConfig:
    """Tiles of at most MAX_TILE_ELEMENTS (memory and link alike), about 16 per thread.

    N=64, W=64: one memory tile and one link block of 4096 elements, 8 warps. N=256, W=64:
    two memory tiles of 128 rows, eight link blocks of 32 x 256, 16 warps. Half the NTM's
    elements per thread, because a program also keeps full-length weightings and the
    backward accumulators live (ptxas's register counts: docs/performance.md, "Kernels").
    Tuning on a GPU should replace this guess.
    """
    block_w = next_power_of_2(word_size)
    block_n = next_power_of_2(num_rows)
    block_rows = max(1, min(block_n, MAX_TILE_ELEMENTS // block_w))
    block_link = max(1, min(block_n, MAX_TILE_ELEMENTS // block_n))
    largest_tile = max(block_rows * block_w, block_link * block_n)
    num_warps = min(16, max(4, largest_tile // 512))
    return LaunchConfig(block_rows, block_w, block_n, block_link, num_warps)


def check_config(config: LaunchConfig, num_rows: int, word_size: int) -> None:
    """Raise ValueError for a tiling that would not cover the slot (checked before launch)."""
    sizes = {
        "block_rows": config.block_rows, "block_w": config.block_w,
        "block_n": config.block_n, "block_link": config.block_link,
    }  # fmt: skip
    for name, size in sizes.items():
        if size < 1 or size & (size - 1):
            raise ValueError(f"config.{name} must be a power of two, got {size}")
    if config.block_n < num_rows or config.block_w < word_size:
        raise ValueError(
            f"config must cover the slot: block_n >= N={num_rows} and block_w >= W={word_size}, "
            f"got {config.block_n} and {config.block_w}"
        )
    if config.block_rows > config.block_n or config.block_link > config.block_n:
        raise ValueError("config.block_rows and config.block_link must be <= block_n")


def kernel_constants(
    num_rows: int, word_size: int, num_read: int, config: LaunchConfig
) -> dict[str, int | bool]:
    """The compile-time constants of `dnc_step_kernel` for one model shape and tiling; the
    kernel's heuristics add HAS_LINK (whether a link pointer is given)."""
    return {
        "N": num_rows, "W": word_size, "R": num_read, "R_PAD": next_power_of_2(num_read),
        "BLOCK_N": config.block_n, "BLOCK_W": config.block_w, "BLOCK_ROWS": config.block_rows,
        "BLOCK_LINK": config.block_link, "ONE_TILE": config.one_tile,
    }  # fmt: skip


def scratch_elements(num_rows: int, num_read: int) -> int:
    """Float32 scratch per batch row: usage, write logits, write weighting; f, b, read logits."""
    return (3 + 3 * num_read) * num_rows


def _launch_triton(
    args: tuple[Tensor | None, ...], reads: Tensor, config: LaunchConfig | None
) -> None:
    """Launch the kernel on validated `dnc_memory_step` arguments, in its order."""
    memory, _, _, link, _, read_weights, slots = args[:7]
    assert memory is not None and read_weights is not None and slots is not None
    if link is None:  # read modes only mix link-based weightings in: without links, unused
        args = (*args[:-1], None)
    batch = slots.shape[0]
    if batch == 0:
        return
    _, num_rows, word_size = memory.shape
    num_read = read_weights.shape[1]
    scratch = torch.empty(
        batch, scratch_elements(num_rows, num_read), dtype=torch.float32, device=memory.device
    )
    config = config or launch_config(num_rows, word_size)
    check_config(config, num_rows, word_size)
    constants = kernel_constants(num_rows, word_size, num_read, config)
    # Without links, precedence, link and read_modes go in as None: the kernel's heuristics
    # turn HAS_LINK off, and the code that would read them is not compiled.
    dnc_step_kernel[(batch,)](*args, reads, scratch, **constants, num_warps=config.num_warps)


def dnc_memory_step(
    memory: Tensor,
    usage: Tensor,
    precedence: Tensor | None,
    link: Tensor | None,
    write_weights: Tensor,
    read_weights: Tensor,
    slots: Tensor,
    read_keys: Tensor,
    read_strengths: Tensor,
    write_key: Tensor,
    write_strength: Tensor,
    erase: Tensor,
    write_vector: Tensor,
    free_gates: Tensor,
    allocation_gate: Tensor,
    write_gate: Tensor,
    read_modes: Tensor | None,
    *,
    out: Tensor | None = None,
    check_slots: bool = True,
    config: LaunchConfig | None = None,
) -> Tensor:
    """One DNC memory step for the sessions in `slots`; updates the pools in place.

    Pools, all float32 or all bfloat16: memory `[S, N, W]`, usage `[S, N]`, precedence
    `[S, N]`, link `[S, N, N]`, write_weights `[S, N]`, read_weights `[S, R, N]`; precedence
    and link are both None for a model without temporal links (read weightings are then the
    content weightings and read_modes may be None). slots `[B]` int64 (-1 = padding row: reads
    and writes nothing, returns zeros). Per row, float32, activated: read_keys `[B, R, W]`,
    read_strengths `[B, R]` >= 1, write_key `[B, W]`, write_strength `[B]` >= 1, erase
    `[B, W]` in [0, 1], write_vector `[B, W]`, free_gates `[B, R]` in [0, 1], allocation_gate
    and write_gate `[B]` in [0, 1], read_modes `[B, R, 3]` a distribution over (backward,
    content, forward). Returns float32 reads `[B, R, W]`. See `kernels.dnc_reference` for the
    equations. Raises ValueError naming the argument before any state changes; value ranges
    are the caller's contract and are not checked.

    `out`, a float32 `[B, R, W]` tensor, receives the reads instead of a new tensor.
    `check_slots=False` skips the slot range and uniqueness check (a device sync) for callers
    that own the slots. `config` overrides the Triton tiling chosen by `launch_config`.
    """
    args = (
        memory, usage, precedence, link, write_weights, read_weights, slots, read_keys,
        read_strengths, write_key, write_strength, erase, write_vector, free_gates,
        allocation_gate, write_gate, read_modes,
    )  # fmt: skip
    validate_dnc_step(*args, check_slots=check_slots)
    reads_shape = tuple(read_keys.shape)
    out = reads_buffer(out, reads_shape, memory.device)
    if select_backend(memory.device) == "triton":
        _launch_triton(args, out, config)
    else:
        out.copy_(dnc_reference.dnc_memory_step(*args))
    return out


def validate_dnc_step(
    memory: Tensor,
    usage: Tensor,
    precedence: Tensor | None,
    link: Tensor | None,
    write_weights: Tensor,
    read_weights: Tensor,
    slots: Tensor,
    read_keys: Tensor,
    read_strengths: Tensor,
    write_key: Tensor,
    write_strength: Tensor,
    erase: Tensor,
    write_vector: Tensor,
    free_gates: Tensor,
    allocation_gate: Tensor,
    write_gate: Tensor,
    read_modes: Tensor | None,
    check_slots: bool = True,
) -> None:
    """Raise ValueError, naming the argument, for anything `dnc_memory_step` cannot run on."""
    if memory.dim() != 3:
        raise ValueError(f"memory must have 3 dimensions, got shape {tuple(memory.shape)}")
    capacity, num_rows, word_size = memory.shape
    if num_rows == 0 or word_size == 0:
        raise ValueError(f"memory must have N >= 1 and W >= 1, got {tuple(memory.shape)}")
    if read_weights.dim() != 3 or read_weights.shape[1] == 0:
        raise ValueError(
            f"read_weights must have shape [{capacity}, R, {num_rows}] with R >= 1, "
            f"got {tuple(read_weights.shape)}"
        )
    num_read = read_weights.shape[1]
    if (precedence is None) != (link is None):
        raise ValueError(
            "precedence and link must both be given (a model with temporal links) or both be "
            f"None, got precedence={_kind(precedence)} and link={_kind(link)}"
        )
    if link is not None and read_modes is None:
        raise ValueError("read_modes is required when link is given")
    pools: list[tuple[str, Tensor, tuple[int, ...]]] = [
        ("memory", memory, (capacity, num_rows, word_size)),
        ("usage", usage, (capacity, num_rows)),
        ("write_weights", write_weights, (capacity, num_rows)),
        ("read_weights", read_weights, (capacity, num_read, num_rows)),
    ]
    if precedence is not None and link is not None:
        pools.append(("precedence", precedence, (capacity, num_rows)))
        pools.append(("link", link, (capacity, num_rows, num_rows)))
    device = memory.device
    for name, pool, shape in pools:
        if tuple(pool.shape) != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} to match memory {tuple(memory.shape)}, "
                f"got {list(pool.shape)}"
            )
        if pool.dtype not in POOL_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16, got {pool.dtype}")
        if pool.dtype != memory.dtype:
            raise ValueError(
                f"{name} must have the memory's dtype {memory.dtype}, got {pool.dtype}"
            )
        if not pool.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
        if pool.device != device:
            raise ValueError(f"{name} is on {pool.device} but memory is on {device}")
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(
            f"slots must be a 1-D int64 tensor, got {slots.dtype} {tuple(slots.shape)}"
        )
    if slots.device != device:
        raise ValueError(f"slots is on {slots.device} but memory is on {device}")
    batch = slots.shape[0]
    interface: list[tuple[str, Tensor, tuple[int, ...]]] = [
        ("read_keys", read_keys, (batch, num_read, word_size)),
        ("read_strengths", read_strengths, (batch, num_read)),
        ("write_key", write_key, (batch, word_size)),
        ("write_strength", write_strength, (batch,)),
        ("erase", erase, (batch, word_size)),
        ("write_vector", write_vector, (batch, word_size)),
        ("free_gates", free_gates, (batch, num_read)),
        ("allocation_gate", allocation_gate, (batch,)),
        ("write_gate", write_gate, (batch,)),
    ]
    if read_modes is not None:
        interface.append(("read_modes", read_modes, (batch, num_read, NUM_READ_MODES)))
    for name, tensor, shape in interface:
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but memory is on {device}")
    if check_slots:
        validate_slots(slots, capacity)


def _kind(tensor: Tensor | None) -> str:
    return "None" if tensor is None else f"a {list(tensor.shape)} tensor"

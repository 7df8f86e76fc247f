"""What the host side of every kernel family shares: pool dtypes, tile arithmetic, the slot
check and the output buffer."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

POOL_DTYPES = (torch.float32, torch.bfloat16)
# Elements of one register tile a program keeps live (memory rows, link rows, ...).
MAX_TILE_ELEMENTS = 8192


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (value >= 1)."""
    return 1 << (value - 1).bit_length()


def validate_slots(slots: Tensor, capacity: int) -> None:
    """Raise ValueError unless every slot is -1 (padding) or in [0, capacity), the live ones
    unique: two programs on one slot would race. Costs a device sync.

    Every served launch passes here, so the common case is cheap: one min/max and one
    count per slot (bincount) rather than masks and a sort; the offenders are only looked
    for once something is wrong."""
    if slots.numel() == 0:
        return
    if slots.device.type == "cpu" and slots.dtype == torch.int64:
        _validate_host_slots(slots.numpy(), capacity)  # the same memory: a few µs less
        return
    low, high = (int(bound) for bound in slots.aminmax())
    if low < -1 or high >= capacity:
        out_of_range = slots[(slots < -1) | (slots >= capacity)]
        raise ValueError(
            f"slots must be -1 (padding) or in [0, {capacity}), got {out_of_range[:8].tolist()}"
        )
    live = slots if low >= 0 else slots[slots >= 0]
    if live.numel() < 2:
        return
    counts = torch.bincount(live)
    if int(counts.max()) > 1:
        repeated = torch.nonzero(counts > 1).flatten()
        raise ValueError(
            f"slots must not repeat within one call, got {repeated[:8].tolist()} more than once"
        )


def _validate_host_slots(slots: np.ndarray, capacity: int) -> None:
    """`validate_slots` for slots in host memory, in numpy (no dispatch per check)."""
    low, high = int(slots.min()), int(slots.max())
    if low < -1 or high >= capacity:
        out_of_range = slots[(slots < -1) | (slots >= capacity)]
        raise ValueError(
            f"slots must be -1 (padding) or in [0, {capacity}), got {out_of_range[:8].tolist()}"
        )
    live = slots if low >= 0 else slots[slots >= 0]
    if live.size < 2:
        return
    ordered = np.sort(live)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if repeated.size:
        raise ValueError(
            f"slots must not repeat within one call, got {repeated[:8].tolist()} more than once"
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether `tensor` holds no NaN or Inf; a device sync off the CPU."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def reads_buffer(out: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """`out` checked to be a contiguous float32 tensor of `shape` on `device`, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {list(shape)}, "
            f"got {out.dtype} {list(out.shape)}"
        )
    if out.device != device:
        raise ValueError(f"out is on {out.device} but memory is on {device}")
    return out

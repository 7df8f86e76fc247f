"""Plain-PyTorch reference of the Neural Turing Machine memory step: the definition of correct.

Every function here is functional (no in-place updates), works in any floating dtype
(float64 included) and is differentiable, so the models train through these pieces with
autograd. `ntm_memory_step` composes them into the in-place pool update that the fused
Triton kernel in `kernels.ntm` performs, and serves as the fallback backend without CUDA.

Shapes: `...` is any batch shape, `H` heads, `N` memory rows, `M` row width, `K` the shift
radius (the shift distribution has 2K+1 entries; entry j+K is the weight of a shift by +j).
"""

from __future__ import annotations

import torch
from torch import Tensor

COSINE_EPS = 1e-8
SHARPEN_EPS = 1e-16


def content_addressing(keys: Tensor, memory: Tensor, beta: Tensor) -> Tensor:
    """c[n] = softmax_n(beta * cos(key, memory[n])) with cos(u,v) = u.v / (|u| |v| + 1e-8).

    keys `[..., H, M]`, memory `[..., N, M]`, beta `[..., H]` (>= 0) -> `[..., H, N]`.
    """
    dots = keys @ memory.transpose(-1, -2)
    norms = keys.norm(dim=-1).unsqueeze(-1) * memory.norm(dim=-1).unsqueeze(-2)
    cosine = dots / (norms + COSINE_EPS)
    return torch.softmax(beta.unsqueeze(-1) * cosine, dim=-1)


def interpolate(content: Tensor, previous: Tensor, gate: Tensor) -> Tensor:
    """g_w = gate * content + (1 - gate) * previous; weightings `[..., H, N]`, gate `[..., H]`."""
    g = gate.unsqueeze(-1)
    return g * content + (1 - g) * previous


def circular_shift(weights: Tensor, shift: Tensor) -> Tensor:
    """s_w[i] = sum_{j=-K..K} shift[j+K] * w[(i - j) mod N]; a shift by +1 moves weight up.

    weights `[..., H, N]`, shift `[..., H, 2K+1]` (a distribution) -> `[..., H, N]`.
    """
    radius = (shift.shape[-1] - 1) // 2
    rolled = torch.stack(
        [torch.roll(weights, j, dims=-1) for j in range(-radius, radius + 1)], dim=-2
    )
    return (shift.unsqueeze(-1) * rolled).sum(dim=-2)


def sharpen(weights: Tensor, gamma: Tensor) -> Tensor:
    """w = s^gamma / (sum_i s_i^gamma + 1e-16), evaluated as (s/max s)^gamma, normalised.

    Dividing by the row maximum first makes the largest term exactly 1, so float32 cannot
    underflow the whole row to zero for large gamma; where the row has any weight the result
    equals the formula up to 1e-16 relative, and an all-zero row stays all zero.
    weights `[..., H, N]` (>= 0), gamma `[..., H]` (>= 1) -> `[..., H, N]`.
    """
    peak = weights.amax(dim=-1, keepdim=True)
    scaled = torch.where(peak > 0, weights / torch.where(peak > 0, peak, 1), 0)
    powered = scaled ** gamma.unsqueeze(-1)
    return powered / (powered.sum(dim=-1, keepdim=True) + SHARPEN_EPS)


def address(
    memory: Tensor,
    previous: Tensor,
    keys: Tensor,
    beta: Tensor,
    gate: Tensor,
    shift: Tensor,
    gamma: Tensor,
) -> Tensor:
    """The full NTM addressing chain: content, interpolation, shift, sharpening."""
    content = content_addressing(keys, memory, beta)
    gated = interpolate(content, previous, gate)
    return sharpen(circular_shift(gated, shift), gamma)


def read(memory: Tensor, weights: Tensor) -> Tensor:
    """reads[h] = sum_n weights[h, n] * memory[n]; weights `[..., R, N]` -> `[..., R, M]`."""
    return weights @ memory


def write(memory: Tensor, weights: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """memory * prod_h (1 - w_h erase_h^T) + sum_h w_h add_h^T over the W write heads.

    memory `[..., N, M]`, weights `[..., W, N]`, erase and add `[..., W, M]` -> `[..., N, M]`.
    """
    keep = (1 - weights.unsqueeze(-1) * erase.unsqueeze(-2)).prod(dim=-3)
    return memory * keep + weights.transpose(-1, -2) @ add


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
) -> Tensor:
    """One NTM memory step for the sessions in `slots`, updating the pools in place.

    memory `[S, N, M]` and weights `[S, R+W, N]` are pools; slots `[B]` (int64, -1 = padding).
    Heads 0..R-1 read, R..R+W-1 write; all of them address the memory as it was before the
    step, reads see the memory before the write. Arithmetic runs in the promoted dtype of
    the parameters and the pools (so a bfloat16 pool with float32 parameters computes in
    float32). Returns reads `[B, R, M]`, zero for padding rows. Arguments are assumed valid:
    `kernels.ntm_memory_step` checks them.

    This is also the backend that serves without CUDA, so it does `write`'s arithmetic in
    place on its own copy of the addressed slots (with one write head, as
    memory - w (erase * memory - add)^T: three passes over the memories instead of four,
    one of them a slow `1 - x`; docs/performance.md, "Kernels", has the timing), and skips
    the row selection when no row is padding.
    """
    num_write = erase.shape[1]
    num_read = weights.shape[1] - num_write
    compute_dtype = torch.promote_types(keys.dtype, memory.dtype)
    batch = slots.shape[0]
    live_rows = slots >= 0
    live: Tensor | None = None  # None: every row is live
    live_slots = slots
    if not bool(live_rows.all()):
        live = torch.nonzero(live_rows).flatten()
        live_slots = slots[live]

    def rows(parameter: Tensor) -> Tensor:
        return (parameter if live is None else parameter[live]).to(compute_dtype)

    reads_shape = (batch, num_read, memory.shape[2])
    if live_slots.numel() == 0:
        return keys.new_zeros(reads_shape, dtype=compute_dtype)
    mem = memory.index_select(0, live_slots).to(compute_dtype)  # a copy, updated below
    previous = weights.index_select(0, live_slots).to(compute_dtype)
    new_weights = address(
        mem, previous, rows(keys), rows(beta), rows(gate), rows(shift), rows(gamma)
    )
    live_reads = read(mem, new_weights[:, :num_read])
    # `write`, in place: memory * prod_h (1 - w_h erase_h^T) + sum_h w_h add_h^T
    write_weights = new_weights[:, num_read:]
    if num_write == 1:  # the same as memory - w (erase * memory - add)^T, in three passes
        change = mem * rows(erase)
        change.sub_(rows(add))
        mem.addcmul_(write_weights.transpose(-1, -2), change, value=-1)
    elif num_write > 1:
        keep = 1 - write_weights.unsqueeze(-1) * rows(erase).unsqueeze(-2)
        mem.mul_(keep.prod(dim=1))
        mem.baddbmm_(write_weights.transpose(-1, -2), rows(add))
    weights.index_copy_(0, live_slots, new_weights.to(weights.dtype))
    memory.index_copy_(0, live_slots, mem.to(memory.dtype))
    if live is None:  # the reads are the rows' own: no zeroed buffer to scatter into
        return live_reads
    reads = keys.new_zeros(reads_shape, dtype=compute_dtype)
    reads[live] = live_reads
    return reads

"""Plain-PyTorch reference of the Differentiable Neural Computer memory step (Graves et al.,
Nature 2016): the definition of correct for the fused kernel in `kernels.dnc`.

Every function is functional (no in-place updates on its inputs), works in any floating
dtype (float64 included) and is differentiable, so the models train through `step` with
autograd. `dnc_memory_step` applies `step` to the live slots of a state pool in place; it is
what the Triton kernel computes and the fallback backend without CUDA.

Shapes: `...` is any batch shape, `N` memory rows, `W` the word size (row width), `R` read
heads, one write head. Equation order and symbols follow the paper's methods section.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels.reference import content_addressing


class DNCState(NamedTuple):
    """One session's (or a batch's) DNC memory state; `precedence` and `link` are None for a
    model without temporal links."""

    memory: Tensor  # [..., N, W]
    usage: Tensor  # [..., N]
    precedence: Tensor | None  # [..., N]
    link: Tensor | None  # [..., N, N], zero diagonal
    write_weights: Tensor  # [..., N]
    read_weights: Tensor  # [..., R, N]


class DNCInterface(NamedTuple):
    """The controller's interface vector, already activated; `read_modes` may be None when
    the state has no link matrix."""

    read_keys: Tensor  # [..., R, W]
    read_strengths: Tensor  # [..., R] >= 1
    write_key: Tensor  # [..., W]
    write_strength: Tensor  # [...] >= 1
    erase: Tensor  # [..., W] in [0, 1]
    write_vector: Tensor  # [..., W]
    free_gates: Tensor  # [..., R] in [0, 1]
    allocation_gate: Tensor  # [...] in [0, 1]
    write_gate: Tensor  # [...] in [0, 1]
    read_modes: Tensor | None  # [..., R, 3], a distribution over (backward, content, forward)


def retention(free_gates: Tensor, read_weights: Tensor) -> Tensor:
    """psi[n] = prod_i (1 - f_i w^r_i[n]); free_gates `[..., R]`, read_weights `[..., R, N]`."""
    return (1 - free_gates.unsqueeze(-1) * read_weights).prod(dim=-2)


def update_usage(usage: Tensor, write_weights: Tensor, psi: Tensor) -> Tensor:
    """u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} * w^w_{t-1}) * psi_t, all `[..., N]`."""
    return (usage + write_weights - usage * write_weights) * psi


def allocation(usage: Tensor) -> Tensor:
    """a[j] = (1 - u[j]) * prod over k less used than j of u[k]; usage `[..., N]`.

    "k less used than j" means u[k] < u[j], or u[k] == u[j] and k < j: exactly the rows that
    precede j in the stable ascending sort of the paper, so this equals `allocation_sorted`
    (the product of the same factors, taken in another order) without a sort. O(N^2) work:
    the Triton kernel's formulation, tested here against the sorted one.
    """
    rows = usage.shape[-1]
    index = torch.arange(rows, device=usage.device)
    mine = usage.unsqueeze(-1)  # u[j] along dim -2
    other = usage.unsqueeze(-2)  # u[k] along dim -1
    before = (other < mine) | ((other == mine) & (index.unsqueeze(0) < index.unsqueeze(1)))
    return (1 - usage) * torch.where(before, other, torch.ones_like(other)).prod(dim=-1)


def allocation_sorted(usage: Tensor) -> Tensor:
    """The paper's literal definition: phi = rows by ascending usage (stable, ties by index),
    a[phi_j] = (1 - u[phi_j]) * prod_{i<j} u[phi_i]. The reference step uses it: on a CPU a
    stable sort of N and a cumulative product beat N^2 comparisons (docs/performance.md,
    "Kernels")."""
    ordered, phi = torch.sort(usage, dim=-1, stable=True)
    exclusive = torch.cumprod(
        torch.cat([torch.ones_like(ordered[..., :1]), ordered[..., :-1]], dim=-1), dim=-1
    )
    return torch.zeros_like(usage).scatter(-1, phi, (1 - ordered) * exclusive)


def write_weighting(
    allocation: Tensor, content: Tensor, allocation_gate: Tensor, write_gate: Tensor
) -> Tensor:
    """w^w = g^w (g^a a + (1 - g^a) c^w); weightings `[..., N]`, gates `[...]`."""
    gate_a = allocation_gate.unsqueeze(-1)
    return write_gate.unsqueeze(-1) * (gate_a * allocation + (1 - gate_a) * content)


def write_memory(
    memory: Tensor, write_weights: Tensor, erase: Tensor, write_vector: Tensor
) -> Tensor:
    """M_t = M_{t-1} * (1 - w^w e^T) + w^w v^T; memory `[..., N, W]`, the rest `[..., N|W]`."""
    weights = write_weights.unsqueeze(-1)
    return memory * (1 - weights * erase.unsqueeze(-2)) + weights * write_vector.unsqueeze(-2)


def update_link(link: Tensor, precedence: Tensor, write_weights: Tensor) -> Tensor:
    """L[i,j] = (1 - w_i - w_j) L[i,j] + w_i p_{t-1}[j], L[i,i] = 0; link `[..., N, N]`,
    precedence (the previous one) and write_weights `[..., N]`."""
    rows = write_weights.unsqueeze(-1)
    cols = write_weights.unsqueeze(-2)
    updated = (1 - rows - cols) * link + rows * precedence.unsqueeze(-2)
    off_diagonal = 1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device)
    return updated * off_diagonal


def update_precedence(precedence: Tensor, write_weights: Tensor) -> Tensor:
    """p_t = (1 - sum_i w^w_i) p_{t-1} + w^w, all `[..., N]`."""
    return (1 - write_weights.sum(dim=-1, keepdim=True)) * precedence + write_weights


def read_weighting(
    link: Tensor | None, read_weights: Tensor, content: Tensor, read_modes: Tensor | None
) -> Tensor:
    """w^r_i = pi_i[0] b_i + pi_i[1] c^r_i + pi_i[2] f_i with f_i = L w^r_i, b_i = L^T w^r_i.

    link `[..., N, N]` (the new one) or None, in which case the content weighting `[..., R, N]`
    is returned; read_weights (the previous ones) `[..., R, N]`; read_modes `[..., R, 3]`.
    """
    if link is None:
        return content
    if read_modes is None:
        raise ValueError("read_modes is required when there is a link matrix")
    forward = read_weights @ link.transpose(-1, -2)  # f[i, n] = sum_j L[n, j] w[i, j]
    backward = read_weights @ link  # b[i, n] = sum_j L[j, n] w[i, j]
    return (
        read_modes[..., 0:1] * backward
        + read_modes[..., 1:2] * content
        + read_modes[..., 2:3] * forward
    )


def step(state: DNCState, interface: DNCInterface) -> tuple[DNCState, Tensor]:
    """One DNC memory step over a batch `[B, ...]`: the new state and the reads `[B, R, W]`.

    Order: usage from the previous weightings, allocation, write weighting on the memory
    before the write, write, link and precedence, read weightings on the memory after the
    write with the new link, reads. Functional and differentiable.
    """
    if (state.link is None) != (state.precedence is None):
        raise ValueError("link and precedence must both be tensors or both be None")
    psi = retention(interface.free_gates, state.read_weights)
    usage = update_usage(state.usage, state.write_weights, psi)
    write_content = content_addressing(
        interface.write_key.unsqueeze(-2), state.memory, interface.write_strength.unsqueeze(-1)
    ).squeeze(-2)
    write_weights = write_weighting(
        allocation_sorted(usage), write_content, interface.allocation_gate, interface.write_gate
    )
    memory = write_memory(state.memory, write_weights, interface.erase, interface.write_vector)
    link, precedence = state.link, state.precedence
    if link is not None and precedence is not None:
        link = update_link(link, precedence, write_weights)
        precedence = update_precedence(precedence, write_weights)
    read_content = content_addressing(interface.read_keys, memory, interface.read_strengths)
    read_weights = read_weighting(link, state.read_weights, read_content, interface.read_modes)
    reads = read_weights @ memory
    new_state = DNCState(memory, usage, precedence, link, write_weights, read_weights)
    return new_state, reads


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
) -> Tensor:
    """One DNC memory step for the sessions in `slots`, updating the pools in place.

    Pools: memory `[S, N, W]`, usage `[S, N]`, precedence `[S, N]`, link `[S, N, N]`,
    write_weights `[S, N]`, read_weights `[S, R, N]` (precedence and link both None for a
    model without links); slots `[B]` int64, -1 = padding. The interface tensors are per row
    as in `DNCInterface`. Arithmetic runs in the promoted dtype of the interface and the
    pools. Returns reads `[B, R, W]`, zero for padding rows. Arguments are assumed valid:
    `kernels.dnc_memory_step` checks them.
    """
    compute_dtype = torch.promote_types(read_keys.dtype, memory.dtype)
    batch, num_read, width = read_keys.shape
    reads = torch.zeros(batch, num_read, width, dtype=compute_dtype, device=read_keys.device)
    live = torch.nonzero(slots >= 0).flatten()
    if live.numel() == 0:
        return reads
    live_slots = slots[live]

    def gather(pool: Tensor) -> Tensor:
        return pool[live_slots].to(compute_dtype)

    def rows(tensor: Tensor) -> Tensor:
        return tensor[live].to(compute_dtype)

    state = DNCState(
        gather(memory),
        gather(usage),
        None if precedence is None else gather(precedence),
        None if link is None else gather(link),
        gather(write_weights),
        gather(read_weights),
    )
    interface = DNCInterface(
        rows(read_keys),
        rows(read_strengths),
        rows(write_key),
        rows(write_strength),
        rows(erase),
        rows(write_vector),
        rows(free_gates),
        rows(allocation_gate),
        rows(write_gate),
        None if read_modes is None else rows(read_modes),
    )
    new_state, live_reads = step(state, interface)
    reads[live] = live_reads
    for pool, value in zip(
        (memory, usage, precedence, link, write_weights, read_weights), new_state, strict=True
    ):
        if pool is not None and value is not None:
            pool[live_slots] = value.to(pool.dtype)
    return reads

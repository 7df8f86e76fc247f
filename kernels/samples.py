"""Random, already-activated kernel inputs for the tests, the benchmarks and the demo."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import Tensor

from kernels.dnc_reference import DNCInterface, DNCState


@dataclass
class NTMStepParams:
    """The per-row parameters of one NTM memory step, in the ranges the kernel expects."""

    keys: Tensor  # [B, H, M]
    beta: Tensor  # [B, H] >= 0
    gate: Tensor  # [B, H] in [0, 1]
    shift: Tensor  # [B, H, 2K+1], a distribution
    gamma: Tensor  # [B, H] >= 1
    erase: Tensor  # [B, W, M] in [0, 1]
    add: Tensor  # [B, W, M]

    def tensors(self) -> tuple[Tensor, ...]:
        """The parameters in the order `ntm_memory_step` takes them."""
        return tuple(getattr(self, field.name) for field in fields(self))

    def to(self, dtype: torch.dtype) -> NTMStepParams:
        """A copy in another dtype (the float64 reference runs on one)."""
        return NTMStepParams(*(tensor.to(dtype) for tensor in self.tensors()))


def random_ntm_params(
    batch: int,
    num_read: int,
    num_write: int,
    width: int,
    radius: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    beta_scale: float = 5.0,
    gamma_scale: float = 2.0,
) -> NTMStepParams:
    """Parameters drawn the way an NTM controller produces them (after its activations)."""
    heads = num_read + num_write

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    return NTMStepParams(
        keys=normal(batch, heads, width),
        beta=beta_scale * uniform(batch, heads),
        gate=uniform(batch, heads),
        shift=torch.softmax(2 * normal(batch, heads, 2 * radius + 1), dim=-1),
        gamma=1 + gamma_scale * uniform(batch, heads),
        erase=uniform(batch, num_write, width),
        add=normal(batch, num_write, width),
    )


def random_ntm_pools(
    capacity: int,
    heads: int,
    rows: int,
    width: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A memory pool `[S, N, M]` of random rows, a weighting pool `[S, H, N]` of distributions."""
    memory = torch.randn(capacity, rows, width, generator=generator)
    weights = torch.softmax(2 * torch.randn(capacity, heads, rows, generator=generator), dim=-1)
    return memory.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)


DNCValues = TypeVar("DNCValues", DNCState, DNCInterface)


def random_dnc_interface(
    batch: int,
    num_read: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    link: bool = True,
    strength_scale: float = 5.0,
) -> DNCInterface:
    """A DNC interface `[B, ...]` drawn the way a controller produces it (after its
    activations); `read_modes` is None when `link` is False."""

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    read_modes = torch.softmax(2 * normal(batch, num_read, 3), dim=-1) if link else None
    return DNCInterface(
        read_keys=normal(batch, num_read, width),
        read_strengths=1 + strength_scale * uniform(batch, num_read),
        write_key=normal(batch, width),
        write_strength=1 + strength_scale * uniform(batch),
        erase=uniform(batch, width),
        write_vector=normal(batch, width),
        free_gates=uniform(batch, num_read),
        allocation_gate=uniform(batch),
        write_gate=uniform(batch),
        read_modes=read_modes,
    )


def random_dnc_pools(
    capacity: int,
    rows: int,
    width: int,
    num_read: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    link: bool = True,
) -> DNCState:
    """DNC state pools `[S, ...]` as a model leaves them after some steps: usage in [0, 1],
    write weighting and precedence of total at most 1, read weightings distributions, link
    matrices non-negative with a zero diagonal and rows summing to at most 1."""

    def sub_distribution(*shape: int) -> Tensor:
        total = torch.rand(*shape[:-1], 1, generator=generator)
        return total * torch.softmax(2 * torch.randn(*shape, generator=generator), dim=-1)

    memory = torch.randn(capacity, rows, width, generator=generator)
    usage = torch.rand(capacity, rows, generator=generator)
    write_weights = sub_distribution(capacity, rows)
    read_weights = torch.softmax(2 * torch.randn(capacity, num_read, rows, generator=generator), -1)
    precedence = link_matrix = None
    if link:
        precedence = sub_distribution(capacity, rows)
        link_matrix = sub_distribution(capacity, rows, rows) * (1 - torch.eye(rows))
    state = DNCState(memory, usage, precedence, link_matrix, write_weights, read_weights)
    return dnc_to(state, dtype, device)


def dnc_to(
    values: DNCValues, dtype: torch.dtype, device: torch.device | str | None = None
) -> DNCValues:
    """A copy of a DNC state or interface in another dtype (the float64 reference runs on
    one), optionally on another device; None entries stay None."""
    return type(values)._make(
        None if tensor is None else tensor.to(device=device, dtype=dtype, copy=True)
        for tensor in values
    )

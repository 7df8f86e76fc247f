"""Random, already-activated kernel inputs for the tests, the benchmarks and the demo."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


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

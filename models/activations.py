"""Activations whose result for one row does not depend on the other rows of its batch.

PyTorch's CPU `sigmoid` and `softplus` run a SIMD loop over most of a tensor and a scalar
loop over its tail, and the two round differently in the last bit; which elements fall in
the tail depends on the batch size, so a session's outputs would depend on who shares its
launch. These are built only from operations that give every element the same bits wherever
it lies: `exp` and `log1p` (PyTorch's vectorised math, which runs its tail through the same
SIMD code), IEEE arithmetic (+, *, /: correctly rounded in both loops), `abs`, `clamp` and
selection. tests/models/test_activations.py checks this at every batch size from 1 to 300,
that the values agree with torch's own to a few ulp, and that both forms below give the same
bits. They serve training and serving alike, so the two paths compute the same function.

Two forms of each: with autograd, the branches are chosen by `torch.where`, whose gradient
at 0 is the one-sided derivative; without it (serving, `torch.no_grad`), the same values
come from `abs` and `clamp`, which unlike `where` run vectorised: `where` made `sigmoid`
about 20x torch's on a CPU (docs/performance.md, "Batch-invariant activations").
"""

from __future__ import annotations

import torch
from torch import Tensor


def _differentiated(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _minus_abs(x: Tensor) -> Tensor:
    """-|x|, with the derivative of the side taken at 0 (abs's would be 0 there). Without
    autograd `-abs(x)`: the same value (up to the sign of a zero, which exp and the sums
    after it do not see)."""
    return torch.where(x >= 0, -x, x) if _differentiated(x) else -x.abs()


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)), from e = exp(-|x|) <= 1 so that no branch overflows (nor its
    gradient): 1 / (1 + e) for x >= 0, e / (1 + e) below. Without autograd the numerator
    is exp(min(x, 0)): exp(0) = 1 above, the same exp(x) as e below."""
    if _differentiated(x):
        e = torch.exp(_minus_abs(x))
        return torch.where(x >= 0, 1, e) / (1 + e)
    denominator = x.abs().neg_().exp_().add_(1)  # in place: the same operations, fewer tensors
    return x.clamp(max=0).exp_().div_(denominator)


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)), finite for every finite x."""
    if _differentiated(x):
        return x.clamp(min=0) + torch.log1p(torch.exp(_minus_abs(x)))
    return x.abs().neg_().exp_().log1p_().add_(x.clamp(min=0))


def oneplus(x: Tensor) -> Tensor:
    """1 + softplus(x): the DNC paper's activation for strengths (>= 1)."""
    return 1 + softplus(x)

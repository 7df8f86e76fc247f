"""Activations whose result for one row does not depend on the other rows of its batch.

PyTorch's CPU `sigmoid` and `softplus` run a SIMD loop over most of a tensor and a scalar
loop over its tail, and the two round differently in the last bit; which elements fall in
the tail depends on the batch size, so a session's outputs would depend on who shares its
launch. These are built only from operations that give every element the same bits wherever
it lies: `exp` and `log1p` (PyTorch's vectorised math, which runs its tail through the same
SIMD code), IEEE arithmetic (+, *, /: correctly rounded in both loops) and selection.
tests/models/test_activations.py checks this at every batch size from 1 to 300, and that the
values agree with torch's own to a few ulp. They serve training and serving alike, so the
two paths compute the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _minus_abs(x: Tensor) -> Tensor:
    """-|x|, with the derivative of the side taken at 0 (abs's would be 0 there)."""
    return torch.where(x >= 0, -x, x)


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)), from e = exp(-|x|) <= 1 so that no branch overflows (nor its
    gradient): 1 / (1 + e) for x >= 0, e / (1 + e) below."""
    e = torch.exp(_minus_abs(x))
    return torch.where(x >= 0, 1, e) / (1 + e)


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)), finite for every finite x."""
    return x.clamp(min=0) + torch.log1p(torch.exp(_minus_abs(x)))


def oneplus(x: Tensor) -> Tensor:
    """1 + softplus(x): the DNC paper's activation for strengths (>= 1)."""
    return 1 + softplus(x)

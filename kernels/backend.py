"""The one place that decides which implementation runs a kernel call.

Compiled Triton on CUDA tensors, the Triton interpreter when `TRITON_INTERPRET=1` (CPU
tensors, used by the tests), the PyTorch reference otherwise. `MEMSERVE_KERNEL_BACKEND`
set to `triton` or `torch` forces one. Triton reads `TRITON_INTERPRET` when the kernels are
defined, so it must be set before `kernels` is first imported.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["triton", "torch"]

BACKEND_ENV = "MEMSERVE_KERNEL_BACKEND"

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # triton ships for Linux only
    TRITON_AVAILABLE = False


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def select_backend(device: torch.device) -> Backend:
    """The backend for tensors on `device`; raises ValueError when a forced one cannot run."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
    triton_runs_here = TRITON_AVAILABLE and (interpreter_enabled() or device.type == "cuda")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_runs_here:
            raise ValueError(
                f"{BACKEND_ENV}=triton cannot run on {device.type} tensors: Triton needs CUDA "
                "tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
                + ("" if TRITON_AVAILABLE else " (and triton is not installed)")
            )
        return "triton"
    return "triton" if triton_runs_here else "torch"


def describe() -> str:
    """A one-line summary of what the backend choice will be on this machine, for logs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = select_backend(device)
    except ValueError as error:
        return f"invalid backend setting: {error}"
    mode = "interpreter" if chosen == "triton" and interpreter_enabled() else "compiled"
    detail = f"triton ({mode})" if chosen == "triton" else "torch reference"
    return f"{detail} on {device.type}"

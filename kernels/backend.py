"""The one place that decides which implementation runs a kernel call.

Compiled Triton on CUDA tensors, the Triton interpreter when `TRITON_INTERPRET=1` (CPU
tensors, used by the tests), the PyTorch reference otherwise. `MEMSERVE_KERNEL_BACKEND`
set to `triton` or `torch` forces one. Where the PyTorch backend would run on the CPU, a
model's whole step runs as the fused CPU step (`kernels.cpu_step`) instead, when a C
compiler is there; `MEMSERVE_FUSED_STEP=0` keeps it in PyTorch operations. Triton reads
`TRITON_INTERPRET` when the kernels are defined, so it must be set before `kernels` is
first imported.
"""

from __future__ import annotations

import ctypes
import os
from typing import Literal

import torch

from kernels import cpu_step

Backend = Literal["triton", "torch"]

BACKEND_ENV = "MEMSERVE_KERNEL_BACKEND"
FUSED_ENV = "MEMSERVE_FUSED_STEP"

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


def use_fused_cpu_step(device: torch.device) -> bool:
    """Whether a model on `device` steps with the fused CPU step: CPU tensors on the PyTorch
    backend, a C compiler at hand, and `MEMSERVE_FUSED_STEP` not `0`."""
    if device.type != "cpu" or os.environ.get(FUSED_ENV, "1").strip() == "0":
        return False
    return select_backend(device) == "torch" and cpu_step.available()


def describe() -> str:
    """A one-line summary of what the backend choice will be on this machine, for logs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = select_backend(device)
    except ValueError as error:
        return f"invalid backend setting: {error}"
    mode = "interpreter" if chosen == "triton" and interpreter_enabled() else "compiled"
    detail = f"triton ({mode})" if chosen == "triton" else "torch reference"
    if use_fused_cpu_step(device):
        detail = "fused CPU step (C), torch reference kernels"
    return f"{detail} on {device.type}"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest; bigger blocks (a pool) are mapped once
TRIM_THRESHOLD_BYTES = 64 << 20


def retain_freed_memory() -> bool:
    """Keep freed CPU buffers in this process's heap instead of returning them to the kernel.

    The reference backend allocates a few buffers of B x N x M floats every launch. glibc
    gives blocks that size back to the kernel when they are freed together (its trim
    threshold follows the largest block freed, not their sum), so every launch would fault
    its buffers in again, page by page. With the thresholds raised, the heap keeps up to
    TRIM_THRESHOLD_BYTES free (what that saves: docs/performance.md, "Kernels"). Call it
    once in a process that serves or measures steps on the CPU (tests/kernels/test_backend.py
    checks it); returns False, changing nothing, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )

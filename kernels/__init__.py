"""Triton kernels for memory-augmented models, each beside its plain-PyTorch reference.

Set `TRITON_INTERPRET=1` before importing this package to run the Triton kernels on CPU
tensors through the interpreter; `kernels.backend` explains how a backend is chosen.
"""

from kernels.backend import select_backend
from kernels.dnc import dnc_memory_step
from kernels.ntm import ntm_memory_step

__all__ = ["dnc_memory_step", "ntm_memory_step", "select_backend"]

"""What steps a bundled NTM or DNC in a server the benchmarks start here, for their tests to
expect (bench/child_server.py sets MEMSERVE_KERNEL_BACKEND=torch): the fused CPU step where
a C compiler built it, else the PyTorch reference."""

from __future__ import annotations

from kernels import cpu_step

CPU_STEP = "fused-cpu" if cpu_step.available() else "torch"

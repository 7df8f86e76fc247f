"""`memserve demo`: batched NTM memory steps on this machine's backend, checked against float64."""

from __future__ import annotations

import time

import torch

from kernels import backend, ntm_memory_step, reference
from kernels.samples import random_ntm_params, random_ntm_pools


def run_demo(sessions: int, batch: int, rows: int, width: int, steps: int, seed: int) -> int:
    """Step `batch` random sessions of a `sessions`-slot pool `steps` times; 0 if all agree."""
    if not 1 <= batch <= sessions:
        raise ValueError(f"--batch must be in 1..--sessions ({sessions}), got {batch}")
    for name, value in (("--rows", rows), ("--width", width), ("--steps", steps)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(seed)
    memory, weights = random_ntm_pools(sessions, 2, rows, width, generator, device=device)
    memory64, weights64 = memory.double(), weights.double()
    state_bytes = (memory[0].numel() + weights[0].numel()) * memory.element_size()
    print(
        f"pool: {sessions} sessions x (memory {rows}x{width} + 2 head weightings), "
        f"{state_bytes} bytes each; backend: {backend.describe()}"
    )
    print(f"{'step':>4}  {'slots (first 6)':<28}{'time':>10}  {'rel. error vs float64':>22}")
    worst = 0.0
    for step in range(steps):
        slots = torch.randperm(sessions, generator=generator)[:batch].to(device)
        params = random_ntm_params(batch, 1, 1, width, 1, generator, device=device)
        start = time.perf_counter()
        reads = ntm_memory_step(memory, weights, slots, *params.tensors())
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        expected = reference.ntm_memory_step(
            memory64, weights64, slots, *params.to(torch.float64).tensors()
        )
        error = max(
            float((reads.double() - expected).norm() / expected.norm()),
            float((memory.double() - memory64).norm() / memory64.norm()),
        )
        worst = max(worst, error)
        shown = str(slots[:6].tolist())
        print(f"{step:>4}  {shown:<28}{elapsed * 1e3:>8.2f}ms  {error:>22.2e}")
    verdict = "agrees with" if worst < 1e-5 else "DIFFERS from"
    print(f"worst relative error {worst:.2e}: the {backend.describe()} {verdict} float64")
    return 0 if worst < 1e-5 else 1

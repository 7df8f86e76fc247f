"""`kernels.backend.retain_freed_memory`: the CPU backend's launches stop faulting their
temporaries in anew. Each case runs in a child, since the setting is for a whole process."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAUNCHES = 60
# A launch's shape of allocation: eight 1 MiB buffers alive at once, then all freed. The
# control maps every buffer on its own (mmap threshold 64 KiB), so each free gives it back.
# glibc's own default is no control: whether it trims the heap after a launch varied from
# run to run and with the environment (from every launch to one in sixty).
CHILD = """
import ctypes, resource, sys, torch
torch.set_num_threads(1)
from kernels.backend import retain_freed_memory
if sys.argv[1] == "retain":
    retained = retain_freed_memory()
else:
    retained = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD

def launch():
    buffers = [torch.ones(1 << 18) for _ in range(8)]
    return sum(float(b.sum()) for b in buffers)

launch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    launch()
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(LAUNCHES)],
        capture_output=True,
        text=True,
        check=True,
    )
    retained, faults = result.stdout.split()
    return retained, int(faults)


def test_retained_memory_is_not_faulted_in_again() -> None:
    retained, faults = page_faults("retain")
    if retained != "True":
        pytest.skip("the C library is not glibc: nothing to tune")
    _, given_back_faults = page_faults("give-back")
    pages_per_launch = 8 * (1 << 20) // 4096
    # The control: memory given back on every free faults in again on every launch.
    assert given_back_faults >= LAUNCHES * pages_per_launch * 9 // 10
    # Retained, what faults is the heap's growth in the first launches, not every launch's.
    assert faults < 2 * pages_per_launch

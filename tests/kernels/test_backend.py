"""`kernels.backend.retain_freed_memory`: the CPU backend's launches stop faulting their
temporaries in anew. Each case runs in a child, since the setting is for a whole process."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAUNCHES = 60
# A launch's shape of allocation: eight 1 MiB buffers alive at once, then all freed. One
# thread, as the docstring measures it: with torch's worker threads the default's faults
# varied from run to run, and the test failed now and then.
CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
from kernels.backend import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else None

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
    _, default_faults = page_faults("default")
    pages_per_launch = 8 * (1 << 20) // 4096
    # glibc's defaults give the 8 MiB back on every free: every page faults again.
    assert default_faults >= LAUNCHES // 2 * pages_per_launch
    # Retained, what faults is the first launches' heap growth, not a launch's pages each.
    assert faults < 2 * pages_per_launch

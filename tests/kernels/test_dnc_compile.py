"""The compiled DNC path, checked without a GPU: the kernel lowers to an sm_90a cubin.

The interpreter runs the kernel's semantics; only the compiler shows that the same source
builds for the H200, and ptxas says whether the serving sizes fit in registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="triton wheel without the NVIDIA backend")
def test_kernel_compiles_for_sm90_without_register_spills() -> None:
    specs = {  # spec N,W,R,LINK,POOL_DTYPE -> whether the slot's memory stays on chip
        "64,64,4,1,float32": True,  # serving sizes of the benchmark
        "256,64,4,1,float32": False,  # memory in two tiles, link in eight row blocks
        "256,64,4,0,bfloat16": False,  # without links
    }
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_dnc", *specs],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = {r["spec"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(reports) == set(specs)
    for spec, on_chip in specs.items():
        report = reports[spec]
        assert report["cubin_bytes"] > 0
        assert report["one_tile"] == on_chip, report
        assert report["spill_bytes"] == 0, report

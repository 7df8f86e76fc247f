"""Compile the NTM kernel for a GPU architecture on a machine without one; print ptxas facts.

Run as `python -m tests.kernels.compile_ntm SPEC...` with TRITON_INTERPRET unset (the
interpreter replaces the compiler). Each SPEC is N,M,R,W,K,POOL_DTYPE; prints one JSON line
per spec: registers, spilled bytes and shared memory of the sm_90a cubin.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kernels.ntm import kernel_constants, launch_config
from kernels.ntm_triton import ntm_step_kernel

POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16"}


def compile_spec(spec: str) -> dict[str, object]:
    """Compile one N,M,R,W,K,POOL_DTYPE configuration for sm_90a and read ptxas -v."""
    rows, width, num_read, num_write, radius, pool_dtype = spec.split(",")
    config = launch_config(int(rows), int(width))
    constants = kernel_constants(
        int(rows), int(width), int(num_read), int(num_write), int(radius), config
    )
    signature = {"memory_ptr": POINTER_TYPES[pool_dtype], "weights_ptr": POINTER_TYPES[pool_dtype]}
    signature["slots_ptr"] = "*i64"
    for name in ("keys", "beta", "gate", "shift", "gamma", "erase", "add", "reads", "scratch"):
        signature[f"{name}_ptr"] = "*fp32"
    signature.update(dict.fromkeys(constants, "constexpr"))
    # A launch specialises pointers to 16-byte alignment (torch allocations are); so does this,
    # or the compiler would not vectorise the loads and the register counts would mislead.
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    aligned = {(i,): [["tt.divisibility", 16]] for i in pointers}
    source = ASTSource(fn=ntm_step_kernel, signature=signature, constexprs=constants, attrs=aligned)
    facts = compile_for_sm90(source, config.num_warps)
    return {"spec": spec, "num_warps": config.num_warps, "one_tile": config.one_tile, **facts}


def compile_for_sm90(source: ASTSource, num_warps: int) -> dict[str, int | None]:
    """Compile `source` for sm_90a and read registers, spilled bytes and cubin size."""
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    # The ptxas that triton itself runs for this architecture: a wheel may ship several
    # (3.9.0's plain `ptxas` is CUDA 12.8 and rejects the PTX 9.4 it writes for sm_90a).
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(folder) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "cubin_bytes": len(compiled.asm["cubin"]),
    }


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(json.dumps(compile_spec(argument)), flush=True)

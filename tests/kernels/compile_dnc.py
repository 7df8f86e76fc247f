"""Compile the DNC kernel for a GPU architecture on a machine without one; print ptxas facts.

Run as `python -m tests.kernels.compile_dnc SPEC...` with TRITON_INTERPRET unset (the
interpreter replaces the compiler). Each SPEC is N,W,R,LINK,POOL_DTYPE with LINK 0 or 1;
prints one JSON line per spec: registers, spilled bytes and cubin size for sm_90a.
"""

from __future__ import annotations

import json
import sys

from triton.compiler import ASTSource

from kernels.dnc import kernel_constants, launch_config
from kernels.dnc_triton import dnc_step_kernel
from tests.kernels.compile_ntm import POINTER_TYPES, compile_for_sm90

POOLS = ("memory", "usage", "precedence", "link", "write_weights", "read_weights")
INTERFACE = (
    "read_keys", "read_strengths", "write_key", "write_strength", "erase", "write_vector",
    "free_gates", "allocation_gate", "write_gate", "read_modes",
)  # fmt: skip


def compile_spec(spec: str) -> dict[str, object]:
    """Compile one N,W,R,LINK,POOL_DTYPE configuration for sm_90a and read ptxas -v."""
    rows, width, num_read, link, pool_dtype = spec.split(",")
    config = launch_config(int(rows), int(width))
    constants = kernel_constants(int(rows), int(width), int(num_read), link == "1", config)
    signature = {f"{name}_ptr": POINTER_TYPES[pool_dtype] for name in POOLS}
    signature["slots_ptr"] = "*i64"
    for name in (*INTERFACE, "reads", "scratch"):
        signature[f"{name}_ptr"] = "*fp32"
    signature.update(dict.fromkeys(constants, "constexpr"))
    # Launches specialise pointers to 16-byte alignment (torch allocations are); so does this.
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    aligned = {(i,): [["tt.divisibility", 16]] for i in pointers}
    source = ASTSource(fn=dnc_step_kernel, signature=signature, constexprs=constants, attrs=aligned)
    facts = compile_for_sm90(source, config.num_warps)
    return {"spec": spec, "num_warps": config.num_warps, "one_tile": config.one_tile, **facts}


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(json.dumps(compile_spec(argument)), flush=True)

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
LINK_ONLY = ("precedence_ptr", "link_ptr", "read_modes_ptr")


def compile_spec(spec: str) -> dict[str, object]:
    """Compile one N,W,R,LINK,POOL_DTYPE configuration for sm_90a and read ptxas -v."""
    rows, width, num_read, link, pool_dtype = spec.split(",")
    config = launch_config(int(rows), int(width))
    has_link = link == "1"
    constants: dict[str, object] = {
        **kernel_constants(int(rows), int(width), int(num_read), config),
        "HAS_LINK": has_link,
    }
    signature = {f"{name}_ptr": POINTER_TYPES[pool_dtype] for name in POOLS}
    signature["slots_ptr"] = "*i64"
    for name in (*INTERFACE, "reads", "scratch"):
        signature[f"{name}_ptr"] = "*fp32"
    if not has_link:  # as a launch without links passes them: None, a constant
        constants.update(dict.fromkeys(LINK_ONLY, None))
    signature.update(dict.fromkeys(constants, "constexpr"))
    # Launches specialise pointers to 16-byte alignment (torch allocations are); so does this.
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    aligned = {(i,): [["tt.divisibility", 16]] for i in pointers}
    # The JIT function under the heuristics that set HAS_LINK at a launch (set above here).
    kernel = dnc_step_kernel.fn
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    facts = compile_for_sm90(source, config.num_warps)
    return {"spec": spec, "num_warps": config.num_warps, "one_tile": config.one_tile, **facts}


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(json.dumps(compile_spec(argument)), flush=True)

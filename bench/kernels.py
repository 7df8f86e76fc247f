"""Benchmark of the fused NTM and DNC memory steps against their PyTorch references.

`--kernel ntm` (the default) or `--kernel dnc` (R=4 read heads, temporal links on; M is
the DNC's word size W). For every (pool dtype, B, N, M) it times, in one run: the fused
Triton kernel (plain launches, and replayed from a CUDA graph, which removes the Python
launch cost), the reference in eager PyTorch, and `torch.compile` of the reference. It
prints microseconds per step, achieved GB/s over the minimum bytes beside the device's
measured copy bandwidth, and speed-ups as ratios measured in the same run; it writes the
whole table as JSON under bench/results/.

Without CUDA only the eager reference runs (the kernel would run on the Triton interpreter,
which says nothing about speed), and the output says so.

    python bench/kernels.py                       # the full NTM grid of the issue
    python bench/kernels.py --batch 1 8192 --rows 128 --width 64 --dtype float32
    python bench/kernels.py --kernel dnc          # N in {64, 256}, W=64, R=4, links on
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import dnc, dnc_reference, reference  # noqa: E402
from kernels.ntm import launch_config, ntm_memory_step  # noqa: E402
from kernels.samples import (  # noqa: E402
    random_dnc_interface,
    random_dnc_pools,
    random_ntm_params,
    random_ntm_pools,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NUM_READ = NUM_WRITE = 1
RADIUS = 1
DNC_NUM_READ = 4
# Default grid per kernel: batch sizes, N, M (W for the DNC).
DEFAULTS = {
    "ntm": {"batch": [1, 64, 1024, 8192], "rows": [128, 1024], "width": [20, 64]},
    "dnc": {"batch": [1, 64, 1024, 4096], "rows": [64, 256], "width": [64]},
}


@dataclass
class Row:
    """One measured configuration."""

    dtype: str
    batch: int
    rows: int
    width: int
    min_bytes: int
    flops: int
    one_tile: bool | None
    microseconds: dict[str, float]
    gbps: dict[str, float]
    speedup_vs_eager: dict[str, float]
    speedup_vs_compiled: dict[str, float]


def minimum_bytes(batch: int, rows: int, width: int, pool_bytes: int) -> int:
    """Bytes a step must move: each addressed slot's memory and weightings read and written
    once, every per-row parameter read once, the reads written once."""
    heads = NUM_READ + NUM_WRITE
    state = 2 * (rows * width + heads * rows) * pool_bytes
    params = 4 * (heads * width + 3 * heads + heads * (2 * RADIUS + 1) + 2 * NUM_WRITE * width)
    return batch * (state + params + 8 + 4 * NUM_READ * width)


def dnc_minimum_bytes(batch: int, rows: int, width: int, pool_bytes: int) -> int:
    """Bytes a DNC step must move: each addressed slot's memory [N, W], link [N, N], usage,
    precedence, write weighting [N] and read weightings [R, N] read and written once, the
    interface read once, the reads written once. The link matrix dominates from N = W."""
    num_read = DNC_NUM_READ
    state = 2 * (rows * width + rows * rows + 3 * rows + num_read * rows) * pool_bytes
    interface = 4 * (num_read * width + 3 * width + 5 * num_read + 3)
    return batch * (state + interface + 8 + 4 * num_read * width)


def dnc_step_flops(batch: int, rows: int, width: int) -> int:
    """Floating-point operations of one DNC step (multiply-adds count two), approximately."""
    num_read = DNC_NUM_READ
    content = 2 * rows * width * (num_read + 1) + 4 * rows * width  # dots, norms before/after
    write = 4 * rows * width
    reads = 4 * rows * width * num_read  # content and link parts accumulate separately
    allocation = 3 * rows * rows  # compare, select, multiply over the N x N relation
    link = 6 * rows * rows + 4 * num_read * rows * rows  # update; forward and backward
    vectors = 12 * rows * (num_read + 1)  # usage, softmaxes, gates, read modes
    return batch * (content + write + reads + allocation + link + vectors)


def step_flops(batch: int, rows: int, width: int) -> int:
    """Floating-point operations of one step (multiply-adds count two)."""
    heads = NUM_READ + NUM_WRITE
    content = 2 * rows * width * (heads + 1)  # key dots and row norms
    addressing = heads * rows * (10 + 2 * (2 * RADIUS + 1))  # softmax, gate, shift, sharpen
    read = 2 * rows * width * NUM_READ
    write = 4 * rows * width * NUM_WRITE
    return batch * (content + addressing + read + write)


def time_cpu(fn: Callable[[], object], budget_s: float) -> float:
    """Median seconds of `fn` on the CPU over about `budget_s` seconds, after a warm-up."""
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 200):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], graph: bool = False) -> float:
    """Median seconds of `fn` on the GPU with Triton's do_bench, optionally graph-replayed."""
    import triton.testing

    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):  # type: ignore[no-untyped-call]
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    else:
        ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    return float(ms) / 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    if device.type == "cuda":
        seconds = time_cuda(lambda: target.copy_(source))
    else:
        seconds = time_cpu(lambda: target.copy_(source), 2.0)
    return 2 * size / seconds / 1e9


@dataclass
class Workload:
    """One configuration's step in each implementation, and what it must move and compute."""

    fused: Callable[[], object]
    eager: Callable[[], object]
    compile: Callable[[], Callable[[], object]]  # builds the torch.compile candidate
    min_bytes: int
    flops: int
    one_tile: bool


def ntm_workload(
    device: torch.device,
    pool_dtype: torch.dtype,
    batch: int,
    rows: int,
    width: int,
    generator: torch.Generator,
) -> Workload:
    """An NTM step over a full pool of `batch` slots in random order."""
    memory, weights = random_ntm_pools(
        batch, NUM_READ + NUM_WRITE, rows, width, generator, pool_dtype, device
    )
    slots = torch.randperm(batch, generator=generator).to(device)
    params = random_ntm_params(batch, NUM_READ, NUM_WRITE, width, RADIUS, generator, device)
    args = (memory, weights, slots, *params.tensors())
    reads = torch.empty(batch, NUM_READ, width, device=device)

    def compile_reference() -> Callable[[], object]:
        step = torch.compile(reference.ntm_memory_step, dynamic=False)
        return lambda: step(*args)

    return Workload(
        fused=lambda: ntm_memory_step(*args, out=reads, check_slots=False),
        eager=lambda: reference.ntm_memory_step(*args),
        compile=compile_reference,
        min_bytes=minimum_bytes(batch, rows, width, torch.finfo(pool_dtype).bits // 8),
        flops=step_flops(batch, rows, width),
        one_tile=launch_config(rows, width).one_tile,
    )


def dnc_workload(
    device: torch.device,
    pool_dtype: torch.dtype,
    batch: int,
    rows: int,
    width: int,
    generator: torch.Generator,
) -> Workload:
    """A DNC step with temporal links over a full pool of `batch` slots in random order."""
    pools = random_dnc_pools(batch, rows, width, DNC_NUM_READ, generator, pool_dtype, device)
    slots = torch.randperm(batch, generator=generator).to(device)
    interface = random_dnc_interface(batch, DNC_NUM_READ, width, generator, device)
    kwargs = {**pools._asdict(), "slots": slots, **interface._asdict()}
    reads = torch.empty(batch, DNC_NUM_READ, width, device=device)

    def compile_reference() -> Callable[[], object]:
        step = torch.compile(dnc_reference.dnc_memory_step, dynamic=False)
        return lambda: step(**kwargs)

    return Workload(
        fused=lambda: dnc.dnc_memory_step(**kwargs, out=reads, check_slots=False),
        eager=lambda: dnc_reference.dnc_memory_step(**kwargs),
        compile=compile_reference,
        min_bytes=dnc_minimum_bytes(batch, rows, width, torch.finfo(pool_dtype).bits // 8),
        flops=dnc_step_flops(batch, rows, width),
        one_tile=dnc.launch_config(rows, width).one_tile,
    )


def measure(
    kernel: str,
    device: torch.device,
    dtype_name: str,
    batch: int,
    rows: int,
    width: int,
    impls: list[str],
    cpu_budget_s: float,
) -> Row:
    """Time every implementation in `impls` on one configuration of `kernel`."""
    generator = torch.Generator().manual_seed(batch * 7919 + rows * 31 + width)
    make_workload = dnc_workload if kernel == "dnc" else ntm_workload
    work = make_workload(device, DTYPES[dtype_name], batch, rows, width, generator)
    candidates = {"fused": work.fused, "eager": work.eager}
    if "compiled" in impls:
        candidates["compiled"] = work.compile()

    seconds: dict[str, float] = {}
    for impl in impls:
        if device.type == "cuda":
            fn = candidates["fused" if impl == "fused_graph" else impl]
            seconds[impl] = time_cuda(fn, graph=impl == "fused_graph")
        else:
            seconds[impl] = time_cpu(candidates[impl], cpu_budget_s)

    def ratios(base: str) -> dict[str, float]:
        if base not in seconds:
            return {}
        return {k: seconds[base] / v for k, v in seconds.items() if k != base}

    return Row(
        dtype=dtype_name,
        batch=batch,
        rows=rows,
        width=width,
        min_bytes=work.min_bytes,
        flops=work.flops,
        one_tile=work.one_tile if "fused" in seconds else None,
        microseconds={k: v * 1e6 for k, v in seconds.items()},
        gbps={k: work.min_bytes / v / 1e9 for k, v in seconds.items()},
        speedup_vs_eager=ratios("eager"),
        speedup_vs_compiled=ratios("compiled"),
    )


def print_row(row: Row, impls: list[str], copy_gbps: float) -> None:
    cells = [f"{row.dtype:>8} {row.batch:>6} {row.rows:>5} {row.width:>4}"]
    for impl in impls:
        us, gbps = row.microseconds[impl], row.gbps[impl]
        cells.append(f"{us:>10.1f} {gbps:>7.1f} ({gbps / copy_gbps:>4.0%})")
    for base, ratio in (("eager", row.speedup_vs_eager), ("compiled", row.speedup_vs_compiled)):
        if "fused" in ratio:
            cells.append(f"fused {ratio['fused']:.2f}x {base}")
    print("  ".join(cells), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kernel", choices=sorted(DEFAULTS), default="ntm")
    parser.add_argument("--batch", type=int, nargs="+", help="B (default: the kernel's grid)")
    parser.add_argument("--rows", type=int, nargs="+", help="N (default: the kernel's grid)")
    parser.add_argument("--width", type=int, nargs="+", help="M, or the DNC's W")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=["fused", "fused_graph", "eager", "compiled"],
        help="implementations to time (default: all on CUDA, eager alone on CPU)",
    )
    parser.add_argument(
        "--cpu-budget", type=float, default=1.0, help="seconds of timing per CPU measurement"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/<name>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    for name, values in DEFAULTS[args.kernel].items():
        if getattr(args, name) is None:
            setattr(args, name, values)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.impl:
        impls = list(args.impl)
    elif device.type == "cuda":
        impls = ["fused", "fused_graph", "eager", "compiled"]
    else:
        impls = ["eager"]
    if device.type == "cpu":
        print("No CUDA device: the fused kernel's speed cannot be measured here; timing the ")
        print(f"PyTorch reference only ({', '.join(impls)}). Run on a GPU for the real table.")
        if "fused" in impls or "fused_graph" in impls:
            raise SystemExit("--impl fused and fused_graph need CUDA")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    copy_gbps = copy_bandwidth(device)
    print(f"device: {device_name or device.type}; measured copy bandwidth {copy_gbps:.0f} GB/s")
    header = [f"{'dtype':>8} {'B':>6} {'N':>5} {'M':>4}"]
    header += [f"{impl + ' us':>10} {'GB/s':>7} {'(copy)':>6}" for impl in impls]
    print("  ".join(header))

    rows: list[Row] = []
    for dtype_name in args.dtype:
        for rows_n in args.rows:
            for width in args.width:
                for batch in args.batch:
                    row = measure(
                        args.kernel, device, dtype_name, batch, rows_n, width, impls,
                        args.cpu_budget,
                    )  # fmt: skip
                    rows.append(row)
                    print_row(row, impls, copy_gbps)

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if args.kernel == "dnc":
        heads: dict[str, Any] = {"read": DNC_NUM_READ, "write": 1, "link": True}
    else:
        heads = {"read": NUM_READ, "write": NUM_WRITE, "shift_radius": RADIUS}
    result = {
        "benchmark": f"{args.kernel}_memory_step",
        "command": " ".join(["python", "bench/kernels.py", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name or device.type,
        "device_type": device.type,
        "versions": versions,
        "heads": heads,
        "copy_bandwidth_gbps": copy_gbps,
        "implementations": impls,
        "rows": [asdict(row) for row in rows],
    }
    out = args.out or ROOT / "bench" / "results" / f"{args.kernel}_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

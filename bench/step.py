"""Issue 20's step table: one serving step of the NTM and of the DNC, session-steps/s.

For each bundled model (`ntm-copy`, `dnc-recall`) and each batch size B, in one process and
one run, with `--threads` intra-op threads (default 1):

  memserve          `model.step(pool, slots, x)`: the public step, with its checks (the
                    issue's column); a pool of max(B) slots, B of them in random order
  memserve_trusted  `model.step(..., check=False)`: what the model process runs
  memserve_torch    the trusted step in PyTorch operations (`MEMSERVE_FUSED_STEP=0`): what
                    the fused CPU step replaces
  eager             bench/eager.py: the plain vectorised eager step, state as [B, ...] tensors
  compiled          `torch.compile` of that eager step (one compile per B, dynamic=False;
                    the compile's seconds are recorded); `--no-compile` leaves it out
  pytorch_ntm       loudinthecloud/pytorch-ntm's EncapsulatedNTM at the NTM's sizes (its own
                    random weights), from a snapshot outside this repository given by
                    `--pytorch-ntm DIR`; without it, skipped with a note. It has no DNC.

Each implementation's state evolves as it steps (the eager steps are fed their own new
state). Timing: per call, wall clock and this thread's CPU time, medians over `--seconds`
of calls after a warm-up; `--rounds` rounds, the implementations in a rotated order in each,
and every figure is the median over the rounds of that round's value (ratios too: each
round's ratio, then the median). The CPU time is the one the targets are decided on: on a
shared machine a long call is preempted more often than a short one, which the wall clock
charges to the long one. The machine's load average and stolen time before and after go
to the record.

With `--profile-batch B` (default 64), torch.profiler counts the operations of one step of
each of memserve's paths and of the eager step at that B, and where their CPU time goes.

On a CUDA device (`--devices cuda`, the default where one is present) the same models at
`--cuda-batches` run memserve's trusted step (Triton kernels) and the eager and compiled
steps, each also replayed from a CUDA graph ("_graph"); pytorch-ntm builds CPU tensors in
its step and is not run there. A failure of one implementation is recorded, not raised.

The targets (issue 20): memserve's step at least 1.5x the eager step at every B, and at least
10x pytorch-ntm at B >= 64, one thread, both models. JSON: bench/results/step-cpu.json (with
a CUDA device, step-cuda.json beside it).

    python bench/step.py --pytorch-ntm /tmp/pytorch-ntm            # the table, about 10 min
    python bench/step.py --batches 1 64 --rounds 1 --no-compile     # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import eager  # noqa: E402
from bench.serving import cpu_name, git_state  # noqa: E402
from kernels import cpu_step  # noqa: E402
from kernels.backend import BACKEND_ENV, FUSED_ENV, retain_freed_memory  # noqa: E402
from models import checkpoint  # noqa: E402
from models.controller import ControllerMemoryModel  # noqa: E402
from models.dnc import DNC  # noqa: E402
from models.ntm import NTM  # noqa: E402

MODELS = ("ntm-copy", "dnc-recall")
BATCHES = (1, 16, 64, 256)
CUDA_BATCHES = (1, 64, 1024, 8192)
IMPLS = ("memserve", "memserve_trusted", "memserve_torch", "eager", "compiled", "pytorch_ntm")
EAGER_TARGET = 1.5  # memserve's step over the eager step, every B
PYTORCH_NTM_TARGET = 10.0  # memserve's step over pytorch-ntm, B >= PYTORCH_NTM_FROM
PYTORCH_NTM_FROM = 64
PROFILE_STEPS = 20

Step = Callable[[], object]


# ---------------------------------------------------------------------------- timing


def time_cpu(fn: Step, seconds: float, min_calls: int = 5) -> dict[str, float]:
    """Median wall and thread-CPU microseconds per call of `fn` over `seconds` of calls,
    after a warm-up of a tenth of that (at least two calls)."""
    warm_until = time.perf_counter() + seconds / 10
    fn()
    fn()
    while time.perf_counter() < warm_until:
        fn()
    walls: list[int] = []
    cpus: list[int] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until or len(walls) < min_calls:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        cpus.append(time.thread_time_ns() - cpu)
        walls.append(time.perf_counter_ns() - wall)
    return {
        "wall_us": statistics.median(walls) / 1e3,
        "cpu_us": statistics.median(cpus) / 1e3,
        "calls": len(walls),
    }


def time_cuda(fn: Step, graph: bool) -> dict[str, float]:
    """Median microseconds per call on the GPU (Triton's do_bench), graph-replayed or not."""
    from bench.kernels import time_cuda as measure

    return {"wall_us": measure(fn, graph=graph) * 1e6}


def machine_load() -> dict[str, float]:
    """Load averages and the CPU seconds stolen by the host so far (from /proc)."""
    facts: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
        facts.update(load_1m=float(one), load_5m=float(five), load_15m=float(fifteen))
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        facts["steal_s"] = int(fields[8]) / os.sysconf("SC_CLK_TCK")
    return facts


@contextlib.contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ---------------------------------------------------------------------------- workloads


def load_pytorch_ntm(folder: Path | None) -> tuple[Any, str]:
    """pytorch-ntm's EncapsulatedNTM class from `folder`, or None and why not."""
    if folder is None:
        return None, "not run: no --pytorch-ntm DIR (a snapshot of loudinthecloud/pytorch-ntm)"
    folder = folder.resolve()
    if folder == ROOT or ROOT in folder.parents:
        raise SystemExit(f"--pytorch-ntm {folder} is inside this repository: keep it outside")
    if not (folder / "ntm" / "aio.py").is_file():
        return None, f"not run: {folder} holds no ntm/aio.py"
    sys.path.insert(0, str(folder))
    try:
        from ntm.aio import EncapsulatedNTM  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
    commit = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return EncapsulatedNTM, f"{folder} at {commit or 'an unknown commit'}"


class Workloads:
    """Every implementation's step for one model at one B on one device."""

    def __init__(
        self,
        model: ControllerMemoryModel,
        batch: int,
        capacity: int,
        device: torch.device,
        encapsulated_ntm: Any,
        compile_steps: bool,
    ) -> None:
        generator = torch.Generator().manual_seed(batch)
        self.model, self.batch, self.device = model, batch, device
        self.pool = model.new_pool(capacity, device)
        with torch.no_grad():  # every slot a new session, in one copy per state tensor
            for name, initial in model.initial_state().items():
                self.pool[name].copy_(initial.to(device).expand_as(self.pool[name]))
        self.slots = torch.randperm(capacity, generator=generator)[:batch].to(device)
        self.inputs = torch.rand(batch, model.input_size, generator=generator).to(device)
        self.eager_step: Any = eager.ntm_step if isinstance(model, NTM) else eager.dnc_step
        assert isinstance(model, NTM | DNC)
        self.state = eager.initial_state(model, batch)
        self.state = {name: tensor.to(device) for name, tensor in self.state.items()}
        self.compile_seconds: float | None = None
        self.compiled: Any = None
        self.notes: dict[str, str] = {}
        if compile_steps:
            self.compiled = torch.compile(self.eager_step, dynamic=False)
        self.ntm: Any = None
        if encapsulated_ntm is not None and isinstance(model, NTM) and device.type == "cpu":
            c = model.config
            if c.read_heads != c.write_heads or c.shift_radius != 1:
                self.notes["pytorch_ntm"] = "its heads come in read/write pairs with 3 shifts"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(batch)
                    self.ntm = encapsulated_ntm(
                        c.input_size, c.output_size, c.controller_size, c.controller_layers,
                        c.read_heads, c.memory_rows, c.memory_width,
                    )  # fmt: skip
                    self.ntm.init_sequence(batch)

    def memserve(self) -> object:
        return self.model.step(self.pool, self.slots, self.inputs)

    def memserve_trusted(self) -> object:
        return self.model.step(self.pool, self.slots, self.inputs, check=False)

    def eager(self) -> object:
        self.state, outputs = self.eager_step(self.model, self.state, self.inputs)
        return outputs

    def eager_fixed(self) -> object:  # for graph capture: no Python state between calls
        return self.eager_step(self.model, self.state, self.inputs)[1]

    def compiled_step(self) -> object:
        if self.compile_seconds is None:
            start = time.perf_counter()
            self.state, outputs = self.compiled(self.model, self.state, self.inputs)
            self.compile_seconds = time.perf_counter() - start
            return outputs
        self.state, outputs = self.compiled(self.model, self.state, self.inputs)
        return outputs

    def pytorch_ntm(self) -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its F.sigmoid
            return self.ntm(self.inputs)[0]

    def cpu_steps(self) -> dict[str, tuple[Step, str | None]]:
        """name -> (step, MEMSERVE_FUSED_STEP while it runs)."""
        steps: dict[str, tuple[Step, str | None]] = {
            "memserve": (self.memserve, None),
            "memserve_trusted": (self.memserve_trusted, None),
            "memserve_torch": (self.memserve_trusted, "0"),
            "eager": (self.eager, None),
        }
        if self.compiled is not None:
            steps["compiled"] = (self.compiled_step, None)
        if self.ntm is not None:
            steps["pytorch_ntm"] = (self.pytorch_ntm, None)
        return steps


# ---------------------------------------------------------------------------- CPU table


def run_cpu(args: argparse.Namespace, encapsulated_ntm: Any) -> dict[str, Any]:
    """Every (model, B, implementation) in `args.rounds` rotated rounds on the CPU."""
    device = torch.device("cpu")
    capacity = max(args.batches)
    works = {
        (name, batch): Workloads(
            load_model(name, device), batch, capacity, device, encapsulated_ntm,
            not args.no_compile,
        )
        for name in args.models
        for batch in args.batches
    }  # fmt: skip
    rounds: list[dict[str, Any]] = []
    with torch.no_grad():
        for index in range(args.rounds):
            measured: dict[str, Any] = {}
            for (name, batch), work in works.items():
                steps = list(work.cpu_steps().items())
                shift = index % len(steps)
                row = {}
                for impl, (fn, fused) in steps[shift:] + steps[:shift]:
                    with environment(FUSED_ENV, fused):
                        row[impl] = time_cpu(fn, args.seconds)
                measured[f"{name} B={batch}"] = row
                print(f"round {index + 1} {name} B={batch}: " + ", ".join(
                    f"{impl} {batch / t['cpu_us'] * 1e6:,.0f}/s" for impl, t in row.items()
                ), flush=True)  # fmt: skip
            rounds.append(measured)
    rows = []
    for (name, batch), work in works.items():
        key = f"{name} B={batch}"
        impls = list(rounds[0][key])
        summary: dict[str, Any] = {"model": name, "batch": batch, "notes": work.notes}
        for basis in ("cpu_us", "wall_us"):
            per_round = {i: [r[key][i][basis] for r in rounds] for i in impls}
            summary[basis] = {i: statistics.median(v) for i, v in per_round.items()}
            summary[f"steps_per_s_{basis.split('_')[0]}"] = {
                i: batch / statistics.median(v) * 1e6 for i, v in per_round.items()
            }
            summary[f"rounds_{basis}"] = per_round
            summary[f"ratios_{basis.split('_')[0]}"] = ratios(per_round)
        summary["compile_seconds"] = work.compile_seconds
        rows.append(summary)
    return {"rows": rows, "targets": targets(rows)}


def ratios(per_round: dict[str, list[float]]) -> dict[str, float]:
    """memserve's paths over the others, each round's ratio of times, then the median."""
    out = {}
    for mine in ("memserve", "memserve_trusted"):
        for other in ("eager", "compiled", "pytorch_ntm", "memserve_torch"):
            if other in per_round:
                pairs = zip(per_round[mine], per_round[other], strict=True)
                out[f"{mine}_vs_{other}"] = statistics.median(o / m for m, o in pairs)
    return out


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 20's CPU targets, decided on CPU time (each line also says the wall clock's)."""
    checks = []
    for row in rows:
        for other, goal, applies in (
            ("eager", EAGER_TARGET, True),
            ("pytorch_ntm", PYTORCH_NTM_TARGET, row["batch"] >= PYTORCH_NTM_FROM),
        ):
            name = f"memserve_vs_{other}"
            if not applies or name not in row["ratios_cpu"]:
                continue
            checks.append({
                "model": row["model"], "batch": row["batch"], "against": other, "goal": goal,
                "ratio": row["ratios_cpu"][name], "ratio_wall": row["ratios_wall"][name],
                "passed": row["ratios_cpu"][name] >= goal,
                "passed_wall": row["ratios_wall"][name] >= goal,
            })  # fmt: skip
    return {"checks": checks, "all_passed": all(check["passed"] for check in checks)}


def load_model(name: str, device: torch.device) -> ControllerMemoryModel:
    model = checkpoint.load(name, device)
    assert isinstance(model, ControllerMemoryModel)
    return model.eval()


# ---------------------------------------------------------------------------- profile


def profile(name: str, batch: int) -> dict[str, Any]:
    """torch.profiler over PROFILE_STEPS steps at `batch` of each path: operations per step
    (all, and the top-level ones Python called), and the ten with most self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    model = load_model(name, torch.device("cpu"))
    work = Workloads(model, batch, max(batch, 1), torch.device("cpu"), None, False)
    paths: dict[str, tuple[Step, str | None]] = {
        "memserve (fused C step)": (work.memserve, None),
        "memserve_trusted (fused C step)": (work.memserve_trusted, None),
        "memserve (PyTorch operations)": (work.memserve, "0"),
        "memserve_trusted (PyTorch operations)": (work.memserve_trusted, "0"),
        "eager": (work.eager, None),
    }
    found: dict[str, Any] = {}
    with torch.no_grad():
        for path, (fn, fused) in paths.items():
            with environment(FUSED_ENV, fused):
                for _ in range(3):
                    fn()
                with profiler(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(PROFILE_STEPS):
                        fn()
            events = [e for e in prof.events() if not e.name.startswith("ProfilerStep")]
            top_level = [e for e in events if e.cpu_parent is None]
            averages = list(prof.key_averages())
            table = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
            total_self = sum(e.self_cpu_time_total for e in averages)
            found[path] = {
                "ops_per_step": len(events) / PROFILE_STEPS,
                "top_level_ops_per_step": len(top_level) / PROFILE_STEPS,
                "self_cpu_us_per_step": total_self / PROFILE_STEPS,
                "top": [
                    {"op": e.key, "calls_per_step": e.count / PROFILE_STEPS,
                     "self_cpu_us_per_step": e.self_cpu_time_total / PROFILE_STEPS}
                    for e in table
                ],
            }  # fmt: skip
    return found


# ---------------------------------------------------------------------------- CUDA


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """memserve's trusted step, the eager and compiled steps on the GPU, graphs off and on."""
    device = torch.device("cuda")
    rows = []
    with environment(BACKEND_ENV, None), torch.no_grad():
        for name in args.models:
            model = load_model(name, device)
            for batch in args.cuda_batches:
                work = Workloads(model, batch, batch, device, None, not args.no_compile)
                row: dict[str, Any] = {"model": name, "batch": batch, "wall_us": {}, "errors": {}}
                candidates: dict[str, tuple[Step, bool]] = {
                    "memserve_trusted": (work.memserve_trusted, False),
                    "memserve_trusted_graph": (work.memserve_trusted, True),
                    "eager": (work.eager_fixed, False),
                    "eager_graph": (work.eager_fixed, True),
                }
                if work.compiled is not None:
                    compiled = work.compiled

                    def fixed(c: Any = compiled, w: Workloads = work) -> object:
                        return c(w.model, w.state, w.inputs)[1]

                    candidates["compiled"] = (fixed, False)
                for impl, (fn, graph) in candidates.items():
                    try:
                        row["wall_us"][impl] = time_cuda(fn, graph)["wall_us"]
                    except Exception as error:  # recorded: one failure must not stop the rest
                        row["errors"][impl] = f"{type(error).__name__}: {error}"[:500]
                row["steps_per_s"] = {i: batch / t * 1e6 for i, t in row["wall_us"].items()}
                speeds = ", ".join(f"{i} {v:,.0f}/s" for i, v in row["steps_per_s"].items())
                errors = f"; errors: {sorted(row['errors'])}" if row["errors"] else ""
                print(f"cuda {name} B={batch}: {speeds}{errors}", flush=True)
                rows.append(row)
    return {"device": torch.cuda.get_device_name(), "rows": rows}


# ---------------------------------------------------------------------------- record


def versions() -> dict[str, str | None]:
    import numpy as np

    found: dict[str, str | None] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
    }  # fmt: skip
    cc = cpu_step.compiler()
    if cc is not None:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True)
        found["cc"] = done.stdout.splitlines()[0] if done.stdout else cc
    else:
        found["cc"] = None
    return found


def print_table(result: dict[str, Any], pytorch_ntm_note: str) -> None:
    print(
        f"\nsession-steps/s on CPU time (wall clock in brackets); pytorch-ntm: {pytorch_ntm_note}"
    )
    for row in result["rows"]:
        cells = [
            f"{impl} {row['steps_per_s_cpu'][impl]:,.0f} ({row['steps_per_s_wall'][impl]:,.0f})"
            for impl in row["steps_per_s_cpu"]
        ]
        print(f"{row['model']} B={row['batch']}: " + ", ".join(cells))
    for check in result["targets"]["checks"]:
        print(
            f"{check['model']} B={check['batch']}: memserve / {check['against']} "
            f"{check['ratio']:.2f} (wall {check['ratio_wall']:.2f}), goal >= {check['goal']:g}: "
            + ("PASS" if check["passed"] else "FAIL")
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--pytorch-ntm", type=Path, help="a checkout of pytorch-ntm, outside")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--profile-batch", type=int, default=64, help="0: no profile")
    parser.add_argument(
        "--devices", nargs="+", choices=["cpu", "cuda"],
        default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
    )  # fmt: skip
    parser.add_argument("--cuda-batches", nargs="+", type=int, default=list(CUDA_BATCHES))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "step-cpu.json",
        help="the CPU record; a CUDA one is written beside it as step-cuda.json",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--batches must be >= 1, --rounds >= 1, --seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with environment(BACKEND_ENV, os.environ.get(BACKEND_ENV) or "torch"):
            run(args, argv)  # on the CPU, the serving path, TRITON_INTERPRET or not
    finally:
        torch.set_num_threads(threads)
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> None:
    retain_freed_memory()  # as the model process does
    encapsulated_ntm, ntm_note = load_pytorch_ntm(args.pytorch_ntm)
    common = {
        "benchmark": "step",
        "command": " ".join(["python", "bench/step.py", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "versions": versions(),
        "git": git_state(),
        "fused_cpu_step": cpu_step.unavailable_reason() or "available",
    }
    if "cpu" in args.devices:
        load_before = machine_load()
        result = run_cpu(args, encapsulated_ntm)
        record = {
            **common,
            "device": cpu_name(),
            "pytorch_ntm": ntm_note,
            "load_before": load_before,
            "load_after": machine_load(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **result,
            "profile": {
                name: profile(name, args.profile_batch) for name in args.models
            } if args.profile_batch else {},
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print_table(result, ntm_note)
        print(f"wrote {args.out}")
    if "cuda" in args.devices:
        if not torch.cuda.is_available():
            raise SystemExit("--devices cuda: no CUDA device here")
        cuda = {**common, **run_cuda(args)}
        out = args.out.with_name("step-cuda.json")
        out.write_text(json.dumps(cuda, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())

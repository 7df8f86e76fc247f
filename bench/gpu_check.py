"""One command for a GPU machine: the GPU tests, the kernel benchmarks and a short serving
benchmark, in under 8 minutes, every result as JSON in one folder, a short table last.

For a machine with CUDA whose Python already has torch and triton, and maybe no network
(`make gpu-check`, or `python3 bench/gpu_check.py --wheels .gpu-wheels`):

1. installs the wheels brought along (`make gpu-wheels` downloads them elsewhere: what
   memserve needs beyond torch and triton, for the GPU machine's Python) into a temporary
   folder that goes first on every step's PYTHONPATH; the machine's packages stay as they are;
2. checks that every module memserve and its tests import loads, and records the device,
   driver and versions;
3. runs each step as a child with its own time limit, inside one budget (default 450 s):
   `pytest -m gpu`; `bench/kernels.py` for the NTM and for the DNC (fused, graph-replayed
   and eager); a short `bench/serving.py --device cuda`; `bench/step.py` on the GPU (the
   whole serving step of both models against the eager step, graphs off and on); then,
   while time is left, each kernel at its headline size against `torch.compile` of its
   reference;
4. writes summary.json (device, versions, each step's command, status, seconds, the GPU
   tests' outcome) beside each benchmark's own JSON and one log.txt, under one folder
   (default bench/results/gpu-check-<UTC time>), and prints a table.

`--dry-run` runs the same flow on the CPU with tiny sizes: the GPU tests skip, the kernel
benchmarks time the PyTorch reference, the server runs on the CPU, and the torch.compile
steps are skipped (on a CPU they need a C++ toolchain and minutes). tests/test_gpu_check.py
runs it. The output folder holds at most eight files, so that it comes back whole from a
lent machine.

    python3 bench/gpu_check.py --wheels .gpu-wheels            # on the GPU machine
    python3 bench/gpu_check.py --steps pytest ntm              # some steps again
    .venv/bin/python bench/gpu_check.py --dry-run              # anywhere, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0  # the steps' share of the 8 minutes; set-up and the table take seconds
MIN_STEP_S = 20.0  # a step is not started with less than this left of the budget
# What memserve and its test suite import beyond the standard library, and the
# distribution each comes from (None: this repository).
REQUIRED_MODULES = {
    "torch": "torch", "triton": "triton", "numpy": "numpy", "grpc": "grpcio",
    "google.protobuf": "protobuf", "grpc_health.v1.health": "grpcio-health-checking",
    "grpc_reflection.v1alpha.reflection": "grpcio-reflection", "hdrh.histogram": "hdrhistogram",
    "prometheus_client": "prometheus-client", "safetensors": "safetensors",
    "tokenizers": "tokenizers", "matplotlib": "matplotlib", "pytest": "pytest",
    "pytest_timeout": "pytest-timeout", "protos.memserve_pb2": None,
}  # fmt: skip


@dataclass
class Step:
    """One child process of the check and what became of it."""

    name: str
    command: list[str]  # argv, the Python executable first
    limit_s: float
    result: str | None = None  # the JSON file it writes in the output folder
    why_skipped: str | None = None  # set for a step that is not to run at all
    status: str = "not run"  # ok, failed, timeout, skipped
    returncode: int | None = None
    seconds: float = 0.0
    output_tail: list[str] = field(default_factory=list)


def kernel_step(
    name: str, kernel: str, sizes: dict[str, list[str]], impls: list[str], out: Path
) -> Step:
    """`bench/kernels.py` for one kernel over `sizes` (option -> values), JSON in `out`."""
    arguments = ["--kernel", kernel]
    for option, values in sizes.items():
        arguments += [f"--{option}", *values]
    if impls:
        arguments += ["--impl", *impls]
    result = f"{name}.json"
    command = [sys.executable, "bench/kernels.py", *arguments, "--out", str(out / result)]
    return Step(name, command, limit_s=100.0, result=result)


def plan(out: Path, junit: Path, dry_run: bool) -> list[Step]:
    """The steps in the order they run: the most important first, torch.compile last."""
    pytest = Step(
        "pytest",
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit}"],
        limit_s=150.0,
    )  # fmt: skip
    if dry_run:  # tiny sizes; on the CPU bench/kernels.py times the eager reference only
        ntm_sizes = {"batch": ["1", "3"], "rows": ["10"], "width": ["4"]}
        dnc_sizes = {"batch": ["2"], "rows": ["12"], "width": ["5"]}
        tiny = {"dtype": ["float32"], "cpu-budget": ["0.05"]}
        ntm = kernel_step("ntm", "ntm", {**ntm_sizes, **tiny}, [], out)
        dnc = kernel_step("dnc", "dnc", {**dnc_sizes, **tiny}, [], out)
        ntm_compile = kernel_step("ntm-compile", "ntm", {**ntm_sizes, **tiny}, [], out)
        dnc_compile = kernel_step("dnc-compile", "dnc", {**dnc_sizes, **tiny}, [], out)
        for step in (ntm_compile, dnc_compile):
            step.why_skipped = "dry run: torch.compile on a CPU needs a C++ toolchain and minutes"
        serving_args = ["--device", "cpu", "--levels", "1", "--batches", "1", "--seconds",
                        "0.3", "--warmup", "0.1", "--step-seconds", "0.05"]  # fmt: skip
        step_args = ["--devices", "cpu", "--batches", "1", "3", "--rounds", "1", "--seconds",
                     "0.02", "--profile-batch", "0"]  # fmt: skip
    else:
        fused = ["fused", "fused_graph", "eager"]
        both = {"dtype": ["float32", "bfloat16"]}
        ntm = kernel_step(
            "ntm", "ntm", {"batch": ["1", "64", "8192"], "rows": ["128", "1024"],
                           "width": ["64"], **both}, fused, out,
        )  # fmt: skip
        dnc = kernel_step(
            "dnc", "dnc", {"batch": ["1", "64", "4096"], "rows": ["64", "256"],
                           "width": ["64"], **both}, fused, out,
        )  # fmt: skip
        headline = ["fused", "eager", "compiled"]
        ntm_compile = kernel_step(
            "ntm-compile", "ntm", {"batch": ["8192"], "rows": ["128"], "width": ["64"],
                                   "dtype": ["float32"]}, headline, out,
        )  # fmt: skip
        dnc_compile = kernel_step(
            "dnc-compile", "dnc", {"batch": ["4096"], "rows": ["64"], "width": ["64"],
                                   "dtype": ["float32"]}, headline, out,
        )  # fmt: skip
        serving_args = ["--device", "cuda", "--levels", "1", "16", "128", "--batches", "1",
                        "128", "--seconds", "2", "--warmup", "1"]  # fmt: skip
        # the CUDA table only (its record is the step's one file); compiles would not fit
        step_args = ["--devices", "cuda", "--cuda-batches", "1", "64", "8192"]
    serving = Step(
        "serving",
        [sys.executable, "bench/serving.py", "--rounds", "1", *serving_args,
         "--out", str(out / "serving.json")],
        limit_s=120.0, result="serving.json",
    )  # fmt: skip
    # --out names the CPU record; the CUDA one is step-cuda.json beside it
    step_result = "step-cpu.json" if dry_run else "step-cuda.json"
    step = Step(
        "step",
        [sys.executable, "bench/step.py", "--no-compile", *step_args,
         "--out", str(out / "step-cpu.json")],
        limit_s=100.0, result=step_result,
    )  # fmt: skip
    return [pytest, ntm, dnc, serving, step, ntm_compile, dnc_compile]


# ---------------------------------------------------------------------------- running


def run_step(step: Step, limit_s: float, env: dict[str, str], log: TextIO) -> None:
    """Run one step in its own process group (a benchmark's servers go with it), its output
    appended to `log`; on the limit, SIGTERM to the group, SIGKILL 10 s later."""
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(
        step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        step.returncode = process.wait(timeout=limit_s)
        step.status = "ok" if step.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        step.status = "timeout"
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        step.returncode = process.wait()
    step.seconds = time.monotonic() - start
    log.write(
        f"===== {step.name}: {step.status} (exit {step.returncode}) in {step.seconds:.1f} s\n"
    )
    log.flush()


def run_steps(
    steps: list[Step],
    budget_s: float,
    env: dict[str, str],
    log_path: Path,
    min_step_s: float = MIN_STEP_S,
) -> None:
    """Run `steps` in order, each within its own limit and what is left of `budget_s`; a
    step is skipped when less than `min_step_s` is left."""
    deadline = time.monotonic() + budget_s
    with log_path.open("a") as log:
        for step in steps:
            left = deadline - time.monotonic()
            if step.why_skipped is None and left < min_step_s:
                step.why_skipped = f"out of time: {left:.0f} s of the {budget_s:.0f} s budget left"
            if step.why_skipped is not None:
                step.status = "skipped"
                print(f"[{step.name}] skipped: {step.why_skipped}", flush=True)
                continue
            print(f"[{step.name}] {' '.join(step.command[1:])}", flush=True)
            offset = log.tell()
            run_step(step, min(step.limit_s, left), env, log)
            with log_path.open() as written:
                written.seek(offset)
                step.output_tail = written.read().splitlines()[-30:-1]
            print(f"[{step.name}] {step.status} in {step.seconds:.1f} s", flush=True)
            if step.status != "ok":
                print("\n".join(step.output_tail[-15:]), flush=True)


# ---------------------------------------------------------------------------- environment


@contextmanager
def overlay(wheels: Path | None, dry_run: bool) -> Iterator[tuple[dict[str, str], list[str]]]:
    """The environment of every step: the wheels in `wheels` installed into a temporary
    folder, first on PYTHONPATH, then the repository. Yields it and the wheels installed."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compiled kernels, wherever CUDA is
    with tempfile.TemporaryDirectory(prefix="memserve-gpu-check-") as scratch:
        paths = [str(ROOT)]
        found = sorted(wheels.glob("*.whl")) if wheels is not None else []
        installed: list[str] = []
        if found:
            site = Path(scratch) / "site"
            done = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                 "--no-compile", "--target", str(site), *map(str, found)],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                paths.insert(0, str(site))
                installed = [path.name for path in found]
            elif dry_run:
                print(f"the wheels in {wheels} do not install here (made for the GPU machine's "
                      "Python?): the dry run uses this Python's packages", flush=True)  # fmt: skip
            else:
                raise SystemExit(f"installing the wheels in {wheels} failed:\n{done.stderr}")
        if shutil.which("git", path=env.get("PATH")) is None:
            # bench/serving.py records the commit with git and has no answer for a machine
            # without it: a stand-in that knows no repository.
            stand_in = Path(scratch) / "bin" / "git"
            stand_in.parent.mkdir()
            stand_in.write_text("#!/bin/sh\nexit 128\n")
            stand_in.chmod(0o755)
            env["PATH"] = os.pathsep.join([str(stand_in.parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        yield env, installed


PROBE = """
import importlib, importlib.metadata, json, platform, sys
found, missing = {}, {}
for pair in sys.argv[1:]:
    name, distribution = pair.split("=")
    try:
        module = importlib.import_module(name)
    except Exception as error:
        missing[name] = f"{type(error).__name__}: {error}"
        continue
    version = importlib.metadata.version(distribution) if distribution else None
    found[name] = {"version": version, "path": getattr(module, "__file__", None)}
facts = {"python": platform.python_version(), "modules": found, "missing": missing}
try:
    import torch
    facts["cuda"] = torch.cuda.is_available()
    facts["torch_cuda"] = torch.version.cuda
    if facts["cuda"]:
        facts["device"] = torch.cuda.get_device_name()
        facts["capability"] = list(torch.cuda.get_device_capability())
        facts["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
except Exception as error:
    facts["cuda_error"] = repr(error)
print(json.dumps(facts))
"""


def probe(env: dict[str, str]) -> dict[str, Any]:
    """What a step's Python sees: versions and paths of REQUIRED_MODULES, the CUDA device."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *(f"{m}={d or ''}" for m, d in REQUIRED_MODULES.items())],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    facts: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        )  # fmt: skip
        facts["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
    return facts


# ---------------------------------------------------------------------------- results


def gpu_tests(junit: Path) -> dict[str, Any]:
    """The outcome of `pytest -m gpu` from its JUnit XML: counts and the failing tests."""
    if not junit.exists():
        return {"report": "missing"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        marks = {"failure": "failed", "error": "errors", "skipped": "skipped"}
        outcome = next(
            (kind for tag, kind in marks.items() if case.find(tag) is not None), "passed"
        )
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failing.append(test_id)
    return {**counts, "failing": failing}


def kernel_lines(record: dict[str, Any]) -> list[str]:
    """Headline rows of a bench/kernels.py record: the first dtype and shape measured, at
    its largest batch (the fused kernel, plain launches) and at its smallest (graph replay,
    which leaves out the launch cost, where it was timed)."""
    rows = record.get("rows", [])
    if not rows:
        return ["no rows"]
    copy = float(record.get("copy_bandwidth_gbps") or 0.0)
    shape = (rows[0]["dtype"], rows[0]["rows"], rows[0]["width"])
    same = [row for row in rows if (row["dtype"], row["rows"], row["width"]) == shape]
    largest = max(same, key=lambda row: row["batch"])
    smallest = min(same, key=lambda row: row["batch"])
    lines = []
    for row in [largest] if largest is smallest else [largest, smallest]:
        seconds, gbps = row["microseconds"], row["gbps"]
        preference = ["fused", "fused_graph"] if row is largest else ["fused_graph", "fused"]
        impl = next((i for i in [*preference, "eager"] if i in seconds), next(iter(seconds)))
        text = (
            f"{row['dtype']} B={row['batch']} N={row['rows']} M={row['width']}: {impl} "
            f"{seconds[impl]:.1f} us, {gbps[impl]:.0f} GB/s"
        )
        if copy:
            text += f" ({gbps[impl] / copy:.0%} of copy)"
        for base in ("eager", "compiled"):
            ratio = row[f"speedup_vs_{base}"].get("fused")
            if ratio is not None:
                text += f", fused {ratio:.2f}x {base}"
        lines.append(text)
    return lines


def serving_lines(record: dict[str, Any]) -> list[str]:
    """The best session-steps/s of the server per call shape, with its median latency."""
    best: dict[str, dict[str, Any]] = {}
    for row in record.get("levels", []):
        if row.get("target") != "server":
            continue
        shape = row["shape"]
        if shape not in best or row["session_steps_per_s"] > best[shape]["session_steps_per_s"]:
            best[shape] = row
    return [
        f"{shape} C={row['concurrency']}: {row['session_steps_per_s']:.0f} session-steps/s, "
        f"p50 {row['latency_us']['p50'] / 1e3:.2f} ms" + ("" if row.get("ok") else ", ERRORS")
        for shape, row in sorted(best.items())
    ] or ["no server rows"]


def step_table_lines(record: dict[str, Any]) -> list[str]:
    """bench/step.py's rows: memserve's step against the eager one, per model and B."""
    lines = []
    for row in record.get("rows", []):
        speeds = row.get("steps_per_s") or row.get("steps_per_s_cpu") or {}
        mine = speeds.get("memserve_trusted_graph") or speeds.get("memserve_trusted")
        eager = speeds.get("eager")
        text = f"{row['model']} B={row['batch']}: memserve {mine or 0:,.0f}/s"
        if mine and eager:
            text += f", {mine / eager:.2f}x eager"
        if row.get("errors"):
            text += f", errors: {', '.join(sorted(row['errors']))}"
        lines.append(text)
    return lines or ["no rows"]


def step_lines(step: Step, out: Path, tests: dict[str, Any]) -> list[str]:
    """What the table says of one step beyond its status."""
    if step.status == "skipped":
        return [step.why_skipped or ""]
    if step.name == "pytest":
        if "passed" not in tests:
            return ["no report"]
        text = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        return [text, *tests["failing"][:5]]
    if step.result is None or not (out / step.result).exists():
        return ["no result"]
    record = json.loads((out / step.result).read_text())
    if step.name == "step":
        return step_table_lines(record)
    return serving_lines(record) if step.name == "serving" else kernel_lines(record)


def print_table(steps: list[Step], out: Path, tests: dict[str, Any], device: str) -> None:
    print(f"\ngpu-check on {device}: results in {out}")
    print(f"{'step':<12} {'status':<8} {'seconds':>7}  result")
    for step in steps:
        lines = step_lines(step, out, tests)
        print(f"{step.name:<12} {step.status:<8} {step.seconds:>7.1f}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<30}{line}")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU, tiny")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install first")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: a new one in bench/results)"
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    names = ["pytest", "ntm", "dnc", "serving", "step", "ntm-compile", "dnc-compile"]
    parser.add_argument("--steps", nargs="+", choices=names, help="only these steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    started = time.monotonic()
    stamp = datetime.now(timezone.utc)
    if args.out is not None:
        out = args.out
    elif args.dry_run:  # not among the results: no GPU measured anything
        out = Path(tempfile.gettempdir()) / f"memserve-gpu-check-dry-run-{stamp:%Y%m%d-%H%M%S}"
    else:
        out = ROOT / "bench" / "results" / f"gpu-check-{stamp:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    with (
        overlay(args.wheels, args.dry_run) as (env, installed),
        tempfile.TemporaryDirectory(prefix="memserve-gpu-check-") as scratch,
    ):
        facts = probe(env)
        device = facts.get("device") or ("cpu" if args.dry_run else "no CUDA device")
        print(f"device: {device}; python {facts['python']}; " + ", ".join(
            f"{name} {facts['modules'][name]['version']}"
            for name in ("torch", "triton") if name in facts["modules"]
        ), flush=True)  # fmt: skip
        if facts["missing"]:
            print(f"missing modules: {facts['missing']}: add their wheels to bench/gpu-wheels.txt")
        elif not args.dry_run and not facts.get("cuda"):
            print("no CUDA device here: run with --dry-run on a CPU")
        junit = Path(scratch) / "pytest-gpu.xml"
        steps = plan(out, junit, args.dry_run)
        if args.steps:
            steps = [step for step in steps if step.name in args.steps]
        ready = not facts["missing"] and (args.dry_run or facts.get("cuda"))
        if ready:
            run_steps(steps, args.budget, env, out / "log.txt")
        tests = gpu_tests(junit)
    summary = {
        "benchmark": "gpu_check",
        "command": " ".join(["python", "bench/gpu_check.py", *argv]),
        "date": stamp.isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "device": device,
        "host": platform.node(),
        "environment": facts,
        "wheels": installed,
        "budget_s": args.budget,
        "seconds": time.monotonic() - started,
        "gpu_tests": tests,
        "steps": [
            {k: v for k, v in asdict(step).items() if k != "output_tail"}
            | {"command": " ".join(["python", *step.command[1:]])}
            for step in steps
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not ready:
        print(f"wrote {out / 'summary.json'}; nothing ran")
        return 2
    print_table(steps, out, tests, device)
    failed = [step.name for step in steps if step.status not in ("ok", "skipped")]
    print(
        f"total {summary['seconds']:.0f} s" + (f"; not ok: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench/gpu_check.py stays ready for a GPU machine: its dry run goes through the whole flow
on the CPU, its steps keep to their limits, and the wheels it brings fit memserve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench import gpu_check
from bench.gpu_check import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROBE_MODULE = "gpu_check_probe"


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel whose module says where it was imported from."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{PROBE_MODULE}-1.0-py3-none-any.whl"
    info = f"{PROBE_MODULE}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{PROBE_MODULE}.py", "WHERE = __file__\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PROBE_MODULE}\n"
                         "Version: 1.0\n")  # fmt: skip
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_the_wheels_come_first_for_every_step(tmp_path: Path) -> None:
    probe_wheel(tmp_path / "wheels")
    with gpu_check.overlay(tmp_path / "wheels", dry_run=False) as (env, installed):
        assert installed == [f"{PROBE_MODULE}-1.0-py3-none-any.whl"]
        where = subprocess.run(
            [sys.executable, "-c", f"import {PROBE_MODULE}, kernels; print({PROBE_MODULE}.WHERE)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        site = env["PYTHONPATH"].split(os.pathsep)[0]
        assert Path(where).parent == Path(site)
        assert "TRITON_INTERPRET" not in env  # the steps compile their kernels where CUDA is
    assert not Path(site).exists()  # the overlay is gone with the check


def test_a_wheel_that_does_not_install_stops_the_check_but_not_the_dry_run(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "wheels" / "broken-1.0-py3-none-any.whl"
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip")
    refused = pytest.raises(SystemExit, match="installing the wheels")
    with refused, gpu_check.overlay(broken.parent, dry_run=False):
        pass
    with gpu_check.overlay(broken.parent, dry_run=True) as (_, installed):
        assert installed == []


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_steps_keep_to_their_limits_and_the_budget(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    steps = [
        gpu_check.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], limit_s=60),
        gpu_check.Step("hangs", [sys.executable, "-c", spawn], limit_s=60),
        gpu_check.Step("late", [sys.executable, "-c", "pass"], limit_s=60),
    ]
    log = tmp_path / "log.txt"
    start = time.monotonic()
    gpu_check.run_steps(steps, budget_s=4.0, env=dict(os.environ), log_path=log, min_step_s=1.0)
    assert time.monotonic() - start < 4.0 + 15.0  # the budget, and SIGTERM's grace at most
    fails, hangs, late = steps
    assert (fails.status, fails.returncode) == ("failed", 3)
    assert hangs.status == "timeout" and hangs.seconds < 4.0 + 11.0
    # The step's whole process group went, not the step alone.
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(grandchild)
    assert late.status == "skipped" and late.why_skipped is not None
    assert "out of time" in late.why_skipped
    assert "===== fails: failed (exit 3)" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run")
@pytest.mark.timeout(300)
def test_dry_run_goes_through_every_step_and_writes_the_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--dry-run", "--out", str(out), "--wheels", str(probe_wheel(tmp_path / "w").parent)]
    assert gpu_check.main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("gpu-check on cpu") :]
    for name in ("pytest", "ntm", "dnc", "serving", "step", "ntm-compile", "dnc-compile"):
        assert f"\n{name} " in table

    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "python bench/gpu_check.py " + " ".join(argv)
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert summary["wheels"] == [f"{PROBE_MODULE}-1.0-py3-none-any.whl"]
    environment = summary["environment"]
    assert environment["missing"] == {} and environment["cuda"] is False
    assert environment["modules"]["grpc"]["version"] and environment["modules"]["torch"]["version"]
    status = {step["name"]: step["status"] for step in summary["steps"]}
    assert status == {"pytest": "ok", "ntm": "ok", "dnc": "ok", "serving": "ok", "step": "ok",
                      "ntm-compile": "skipped", "dnc-compile": "skipped"}  # fmt: skip
    # Without CUDA every GPU test is collected and skipped.
    tests = summary["gpu_tests"]
    assert tests["skipped"] >= 1 and tests["passed"] == tests["failed"] == tests["errors"] == 0

    for step in summary["steps"]:
        if step["status"] == "ok" and step["result"]:  # each benchmark records its command
            record = json.loads((out / step["result"]).read_text())
            assert record["command"] == step["command"]
    ntm = json.loads((out / "ntm.json").read_text())
    assert ntm["benchmark"] == "ntm_memory_step" and ntm["device_type"] == "cpu"
    serving = json.loads((out / "serving.json").read_text())
    assert all(row["ok"] for row in serving["levels"])
    step = json.loads((out / "step-cpu.json").read_text())
    assert step["benchmark"] == "step" and {row["batch"] for row in step["rows"]} == {1, 3}
    # What comes back whole from a lent machine: at most eight files, no folders.
    assert len(list(out.iterdir())) <= 8 and all(path.is_file() for path in out.iterdir())


def test_the_wheels_brought_along_fit_memserves_dependencies() -> None:
    """Each wheel is pinned, is one of memserve's declared dependencies or one of theirs,
    and the pin satisfies what requires it; grpcio and protobuf, which protos/ checks at
    import, are always among them (a GPU image's own may be too old)."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        lines = tomllib.load(handle)["project"]["dependencies"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, lines)}
    for requirement in list(declared.values()):  # what the declared ones need, installed here
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        for line in metadata.requires(requirement.name) or []:
            dependency = Requirement(line)
            if dependency.marker is None:
                declared.setdefault(canonicalize_name(dependency.name), dependency)
    text = (ROOT / "bench" / "gpu-wheels.txt").read_text().splitlines()
    pins = [Requirement(line) for line in text if line.strip() and not line.startswith("#")]
    for pin in pins:
        (specifier,) = pin.specifier
        assert specifier.operator == "==", pin
        name = canonicalize_name(pin.name)
        assert name in declared, f"{pin} is no dependency of memserve"
        assert specifier.version in declared[name].specifier, (pin, declared[name])
    names = {canonicalize_name(pin.name) for pin in pins}
    assert {"grpcio", "protobuf"} <= names
    # Every distribution the check needs is carried, or comes with a CUDA image.
    with_the_image = {"torch", "triton", "numpy", "safetensors", "tokenizers", "matplotlib",
                      "pytest", "pytest-timeout"}  # fmt: skip
    needed = {d for d in gpu_check.REQUIRED_MODULES.values() if d is not None}
    assert needed - with_the_image <= names

"""The `memserve` command as a user runs it: a real subprocess of the installed entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import memserve
from kernels import cpu_step

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, interpret: bool = False) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "memserve", *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "version" in result.stdout and "demo" in result.stdout


def test_version_reports_package_and_backend() -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"memserve {memserve.__version__}\n")
    # The subprocess runs without TRITON_INTERPRET: compiled Triton on CUDA, else the reference,
    # whose models step as the fused C step where a compiler is.
    expected = (
        "triton (compiled) on cuda"
        if torch.cuda.is_available()
        else "fused CPU step (C), torch reference kernels on cpu"
        if cpu_step.available()
        else "torch reference on cpu"
    )
    assert f"kernel backend: {expected}\n" in result.stdout


def test_demo_on_the_interpreted_kernel_agrees_with_float64() -> None:
    result = run_cli(
        "demo", "--sessions", "6", "--batch", "3", "--rows", "12", "--width", "5", "--steps", "2",
        interpret=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "triton (interpreter) on cpu" in result.stdout
    assert "agrees with float64" in result.stdout


def test_demo_rejects_bad_arguments_with_a_clear_message() -> None:
    result = run_cli("demo", "--sessions", "4", "--batch", "9")
    assert result.returncode == 2
    assert "--batch must be in 1..--sessions (4), got 9" in result.stderr


def test_unknown_command_fails() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr

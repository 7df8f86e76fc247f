"""Shared test set-up: Triton runs through its interpreter wherever there is no CUDA device.

Triton reads TRITON_INTERPRET when the kernels are defined, so it is set here, before any
test module imports `kernels`.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:  # importing kernels here would define the kernels before the line below
    from kernels.samples import NTMStepParams

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a non-interactive shell inherits SIGINT ignored
    (POSIX), and an ignored signal stays ignored in every process it starts: neither this
    process nor the chats and load generators the tests interrupt could see a Ctrl-C. Take
    SIGINT back as Python takes it by default, so the tests do not depend on how the suite
    was started."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: compiled on CUDA when present, else the interpreter on CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded afresh every run, with the seed in the test's report on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual64, expected64 = actual.double().cpu(), expected.double().cpu()
    if not bool(torch.isfinite(actual64).all()):
        return float("inf")
    denominator = float(expected64.norm())
    numerator = float((actual64 - expected64).norm())
    return numerator / denominator if denominator > 0 else numerator


def assert_step_matches_float64(
    reads: torch.Tensor,
    memory: torch.Tensor,
    weights: torch.Tensor,
    state64: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    params: NTMStepParams,
    pool_tolerance: float = 1e-5,
) -> None:
    """Advance the float64 copy `state64` of the pools by the same step with the reference,
    then require the step under test (its reads and updated pools) to match it: reads to
    1e-5 relative, the pools to `pool_tolerance` (1e-2 for bfloat16 pools)."""
    from kernels import reference

    memory64, weights64 = state64
    expected = reference.ntm_memory_step(
        memory64, weights64, slots, *params.to(torch.float64).tensors()
    )
    if expected.numel():
        assert relative_error(reads, expected) < 1e-5
    assert relative_error(memory, memory64) < pool_tolerance
    assert relative_error(weights, weights64) < pool_tolerance

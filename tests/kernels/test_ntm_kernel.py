"""The fused NTM kernel against the float64 reference.

On CPU the kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1), on
CUDA compiled; shapes stay tiny so the interpreter finishes quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import kernels
from kernels.ntm import LaunchConfig, launch_config, ntm_memory_step
from kernels.samples import NTMStepParams, random_ntm_params, random_ntm_pools
from tests.conftest import assert_step_matches_float64, relative_error

# (capacity, rows N, width M, read heads R, write heads W, shift radius K, slots)
CASES = [
    pytest.param(6, 100, 20, 1, 1, 1, [4, -1, 0, 5], id="N100-M20-padding"),
    pytest.param(3, 16, 8, 1, 1, 1, [2], id="B1"),
    pytest.param(4, 13, 7, 0, 2, 2, [1, 3], id="R0"),
    pytest.param(4, 9, 5, 3, 0, 3, [0, -1, 2], id="W0"),
    pytest.param(5, 32, 16, 2, 2, 0, [3, 1, -1], id="K0-pow2"),
]


def make_case(
    generator: torch.Generator,
    device: torch.device,
    capacity: int,
    rows: int,
    width: int,
    num_read: int,
    num_write: int,
    radius: int,
    slots: list[int],
    pool_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NTMStepParams]:
    memory, weights = random_ntm_pools(
        capacity, num_read + num_write, rows, width, generator, pool_dtype, device
    )
    params = random_ntm_params(len(slots), num_read, num_write, width, radius, generator, device)
    return memory, weights, torch.tensor(slots, device=device), params


def poisoned_reads(params: NTMStepParams, num_read: int) -> torch.Tensor:
    batch, _, width = params.keys.shape
    return torch.full((batch, num_read, width), float("nan"), device=params.keys.device)


@pytest.mark.parametrize(
    ("capacity", "rows", "width", "num_read", "num_write", "radius", "slots"), CASES
)
def test_kernel_matches_float64_reference_over_repeated_steps(
    generator: torch.Generator,
    device: torch.device,
    capacity: int,
    rows: int,
    width: int,
    num_read: int,
    num_write: int,
    radius: int,
    slots: list[int],
) -> None:
    memory, weights, slot_tensor, _ = make_case(
        generator, device, capacity, rows, width, num_read, num_write, radius, slots
    )
    memory64, weights64 = memory.double(), weights.double()
    untouched = [s for s in range(capacity) if s not in slots]
    memory_before, weights_before = memory[untouched].clone(), weights[untouched].clone()
    for _ in range(3):
        params = random_ntm_params(
            len(slots), num_read, num_write, width, radius, generator, device
        )
        reads = ntm_memory_step(
            memory, weights, slot_tensor, *params.tensors(), out=poisoned_reads(params, num_read)
        )
        assert_step_matches_float64(
            reads, memory, weights, (memory64, weights64), slot_tensor, params
        )
        assert bool(torch.isfinite(reads).all())
        padding = slot_tensor < 0
        assert bool((reads[padding] == 0).all())
    assert torch.equal(memory[untouched], memory_before)
    assert torch.equal(weights[untouched], weights_before)


def test_tiled_path_matches_reference(generator: torch.Generator, device: torch.device) -> None:
    """Memories too large for one tile stream over N; a 16-row tile forces that at N=100."""
    memory, weights, slots, params = make_case(generator, device, 4, 100, 20, 1, 1, 1, [3, -1, 1])
    tiled = LaunchConfig(block_n=16, block_m=32, block_nf=128, num_warps=4)
    assert not tiled.one_tile
    memory64, weights64 = memory.double(), weights.double()
    for _ in range(2):
        reads = ntm_memory_step(
            memory, weights, slots, *params.tensors(), out=poisoned_reads(params, 1), config=tiled
        )
        assert_step_matches_float64(reads, memory, weights, (memory64, weights64), slots, params)


def test_launch_config_keeps_on_chip_sizes_in_one_tile_and_tiles_large_ones() -> None:
    assert launch_config(128, 64).one_tile
    assert launch_config(100, 20).one_tile
    large = launch_config(4096, 256)
    assert not large.one_tile
    assert large.block_n * large.block_m <= 8192 and large.block_nf == 4096


def test_bfloat16_pools(generator: torch.Generator, device: torch.device) -> None:
    memory, weights, slots, params = make_case(
        generator, device, 5, 100, 20, 1, 1, 1, [4, 0, -1], pool_dtype=torch.bfloat16
    )
    memory64, weights64 = memory.double(), weights.double()
    reads = ntm_memory_step(memory, weights, slots, *params.tensors())
    assert memory.dtype == weights.dtype == torch.bfloat16
    # Reads are computed in float32 from the exact bfloat16 values, so stay float32-accurate;
    # the pools store the float32 results rounded to bfloat16 (8 significant bits).
    assert_step_matches_float64(
        reads, memory, weights, (memory64, weights64), slots, params, pool_tolerance=1e-2
    )


def one_hot_case(device: torch.device, rows: int, shift_entry: int) -> list[torch.Tensor]:
    """One read head whose previous weighting is one-hot at row 0, with the gate shut."""
    memory = torch.randn(1, rows, 4).to(device)
    weights = torch.zeros(1, 1, rows, device=device)
    weights[0, 0, 0] = 1.0
    shift = torch.zeros(1, 1, 3, device=device)
    shift[0, 0, shift_entry] = 1.0
    return [
        memory,
        weights,
        torch.tensor([0], device=device),
        torch.randn(1, 1, 4).to(device),  # keys: ignored with the gate shut
        torch.ones(1, 1, device=device),  # beta
        torch.zeros(1, 1, device=device),  # gate: keep the previous weighting
        shift,
        torch.ones(1, 1, device=device),  # gamma
        torch.zeros(1, 0, 4, device=device),  # erase: no write heads
        torch.zeros(1, 0, 4, device=device),  # add
    ]


@pytest.mark.parametrize(("shift_entry", "lands_on"), [(2, 1), (0, 6), (1, 0)])
def test_shift_direction_on_one_hot_weights(
    device: torch.device, shift_entry: int, lands_on: int
) -> None:
    """Entry j+K of the shift is a shift by +j: +1 moves row 0 to 1, -1 wraps it to N-1."""
    args = one_hot_case(device, 7, shift_entry)
    memory = args[0].clone()
    reads = ntm_memory_step(*args)
    expected = torch.zeros(7)
    expected[lands_on] = 1.0
    assert torch.equal(args[1][0, 0].cpu(), expected)
    assert torch.allclose(reads[0, 0], memory[0, lands_on], rtol=1e-6, atol=1e-6)


def test_sharpening_on_a_known_weighting(device: torch.device) -> None:
    args = one_hot_case(device, 3, 1)
    args[1][0, 0] = torch.tensor([0.2, 0.3, 0.5])
    args[7][0, 0] = 2.0  # gamma
    ntm_memory_step(*args)
    expected = torch.tensor([0.04, 0.09, 0.25]) / 0.38
    assert torch.allclose(args[1][0, 0].cpu(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_zero_rows_zero_keys_and_extreme_parameters_stay_finite(
    generator: torch.Generator,
    device: torch.device,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if backend == "torch":
        monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    memory, weights, slots, params = make_case(generator, device, 3, 20, 6, 1, 1, 1, [0, 1, 2])
    memory[0, :7] = 0.0
    memory[2] = 0.0
    params.keys[0] = 0.0
    params.beta[1] = 1e4
    params.gamma[1] = 1e3
    params.gamma[2] = 50.0
    reads = ntm_memory_step(memory, weights, slots, *params.tensors())
    for tensor in (reads, memory, weights):
        assert bool(torch.isfinite(tensor).all())
    # Large gamma concentrates the weighting instead of underflowing it to zero.
    assert torch.allclose(weights[1].sum(-1).cpu(), torch.ones(2), atol=1e-5)
    assert float(weights[1].max()) > 0.99


def test_forced_torch_backend_agrees_with_default(
    generator: torch.Generator, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory, weights, slots, params = make_case(generator, device, 4, 24, 10, 1, 1, 1, [1, 3])
    memory_copy, weights_copy = memory.clone(), weights.clone()
    reads = ntm_memory_step(memory, weights, slots, *params.tensors())
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    assert kernels.select_backend(device) == "torch"
    reads_torch = ntm_memory_step(memory_copy, weights_copy, slots, *params.tensors())
    assert relative_error(reads, reads_torch) < 1e-5
    assert relative_error(memory, memory_copy) < 1e-5


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MEMSERVE_KERNEL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.select_backend(cpu) == "torch"
    assert kernels.select_backend(cuda) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.select_backend(cpu) == "triton"
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    assert kernels.select_backend(cuda) == "torch"
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MEMSERVE_KERNEL_BACKEND"):
        kernels.select_backend(cpu)
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.select_backend(cpu)


def _valid_args(device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    memory, weights, slots, params = make_case(generator, device, 4, 10, 6, 1, 1, 1, [2, 0])
    return {"memory": memory, "weights": weights, "slots": slots, **vars(params)}


def _slots(args: dict[str, Any], values: list[int]) -> torch.Tensor:
    return torch.tensor(values, device=args["memory"].device)


Mutation = Callable[[dict[str, Any]], None]

INVALID: list[tuple[str, Mutation, str]] = [
    ("keys-shape", lambda a: a.update(keys=a["keys"][:, :, :5].contiguous()), "keys"),
    ("beta-batch", lambda a: a.update(beta=a["beta"][:1].contiguous()), "beta"),
    ("shift-even", lambda a: a.update(shift=a["shift"][:, :, :2].contiguous()), "shift"),
    ("shift-too-wide", lambda a: a.update(shift=torch.ones(2, 2, 9)), "shift"),
    ("erase-heads", lambda a: a.update(erase=torch.zeros(2, 3, 6)), "erase"),
    ("add-width", lambda a: a.update(add=torch.zeros(2, 1, 5)), "add"),
    ("weights-rows", lambda a: a.update(weights=torch.zeros(4, 2, 11)), "weights"),
    ("memory-rank", lambda a: a.update(memory=a["memory"][0]), "memory"),
    ("memory-dtype", lambda a: a.update(memory=a["memory"].double()), "memory"),
    ("keys-dtype", lambda a: a.update(keys=a["keys"].double()), "keys"),
    ("gamma-half", lambda a: a.update(gamma=a["gamma"].half()), "gamma"),
    ("slots-dtype", lambda a: a.update(slots=a["slots"].int()), "slots"),
    ("slots-repeat", lambda a: a.update(slots=_slots(a, [1, 1])), "repeat"),
    ("slots-range", lambda a: a.update(slots=_slots(a, [4, 0])), r"\[0, 4\)"),
    ("slots-negative", lambda a: a.update(slots=_slots(a, [-2, 0])), "slots"),
    ("memory-strided", lambda a: a.update(memory=a["memory"].transpose(1, 2)), "memory"),
    ("gate-device", lambda a: a.update(gate=a["gate"].to("meta")), "gate"),
    ("out-shape", lambda a: a.update(out=torch.zeros(2, 2, 6)), "out"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_arguments_raise_and_change_nothing(
    device: torch.device, mutate: Mutation, message: str
) -> None:
    args = _valid_args(device)
    memory, weights = args["memory"], args["weights"]
    memory_before, weights_before = memory.clone(), weights.clone()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ntm_memory_step(**args)
    assert torch.equal(memory, memory_before)
    assert torch.equal(weights, weights_before)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "width", "batch", "pool_dtype"),
    [
        (128, 64, 1024, torch.float32),
        (128, 64, 1024, torch.bfloat16),
        (1024, 20, 256, torch.float32),
        (4096, 256, 8, torch.float32),
    ],
)
def test_compiled_kernel_at_serving_sizes(
    generator: torch.Generator, rows: int, width: int, batch: int, pool_dtype: torch.dtype
) -> None:
    device = torch.device("cuda")
    capacity = batch + 7
    slots = torch.randperm(capacity, generator=generator)[:batch].tolist()
    slots[batch // 2] = -1
    memory, weights, slot_tensor, params = make_case(
        generator, device, capacity, rows, width, 1, 1, 1, slots, pool_dtype
    )
    memory64, weights64 = memory.double(), weights.double()
    reads = ntm_memory_step(
        memory, weights, slot_tensor, *params.tensors(), out=poisoned_reads(params, 1)
    )
    pool_tolerance = 1e-5 if pool_dtype == torch.float32 else 1e-2
    assert_step_matches_float64(
        reads, memory, weights, (memory64, weights64), slot_tensor, params, pool_tolerance
    )

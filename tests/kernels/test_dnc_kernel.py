"""The fused DNC kernel against the float64 reference.

On CPU the kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1), on
CUDA compiled; shapes stay tiny so the interpreter finishes quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import kernels
from kernels import dnc_reference
from kernels.backend import select_backend
from kernels.dnc import LaunchConfig, launch_config
from kernels.dnc_reference import DNCInterface, DNCState
from kernels.samples import dnc_to, random_dnc_interface, random_dnc_pools
from tests.conftest import relative_error


def run_step(
    pools: DNCState,
    slots: torch.Tensor,
    interface: DNCInterface,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """`kernels.dnc_memory_step` on pools and an interface, reads poisoned with NaN first."""
    if out is None:
        out = torch.full(interface.read_keys.shape, float("nan"), device=slots.device)
    return kernels.dnc_memory_step(
        *pools, slots=slots, **interface._asdict(), out=out, config=config
    )


def assert_matches_float64(
    reads: torch.Tensor,
    pools: DNCState,
    pools64: DNCState,
    slots: torch.Tensor,
    interface: DNCInterface,
    pool_tolerance: float = 1e-5,
    reads_tolerance: float = 1e-5,
) -> None:
    """Advance the float64 copy `pools64` by the same step with the reference, then require
    the step under test (its reads and every updated pool) to match it."""
    interface64 = dnc_to(interface, torch.float64)
    expected = dnc_reference.dnc_memory_step(*pools64, slots=slots, **interface64._asdict())
    assert relative_error(reads, expected) < reads_tolerance
    for name, pool, pool64 in zip(DNCState._fields, pools, pools64, strict=True):
        assert (pool is None) == (pool64 is None)
        if pool is not None and pool64 is not None:
            assert relative_error(pool, pool64) < pool_tolerance, name


# (capacity, rows N, word size W, read heads R, link, slots)
CASES = [
    pytest.param(5, 12, 5, 2, True, [3, -1, 0], id="N12-W5-link-padding"),
    pytest.param(5, 12, 5, 2, False, [4, 1, -1], id="N12-W5-nolink-padding"),
    pytest.param(3, 16, 8, 1, True, [2], id="B1-pow2"),
    pytest.param(4, 20, 3, 3, True, [1, 3], id="N20-R3"),
]


@pytest.mark.parametrize(("capacity", "rows", "width", "num_read", "link", "slots"), CASES)
def test_kernel_matches_float64_reference_over_repeated_steps(
    generator: torch.Generator,
    device: torch.device,
    capacity: int,
    rows: int,
    width: int,
    num_read: int,
    link: bool,
    slots: list[int],
) -> None:
    pools = random_dnc_pools(capacity, rows, width, num_read, generator, device=device, link=link)
    pools64 = dnc_to(pools, torch.float64)
    slot_tensor = torch.tensor(slots, device=device)
    untouched = [s for s in range(capacity) if s not in slots]
    before = dnc_to(pools, torch.float32)
    for _ in range(3):
        interface = random_dnc_interface(len(slots), num_read, width, generator, device, link)
        reads = run_step(pools, slot_tensor, interface)
        assert_matches_float64(reads, pools, pools64, slot_tensor, interface)
        assert bool((reads[slot_tensor < 0] == 0).all())
    for pool, original in zip(pools, before, strict=True):
        if pool is not None and original is not None:
            assert torch.equal(pool[untouched], original[untouched])


@pytest.mark.parametrize("link", [True, False], ids=["link", "nolink"])
def test_tiled_path_matches_reference(
    generator: torch.Generator, device: torch.device, link: bool
) -> None:
    """Large slots stream the memory in row tiles and the link matrix in row blocks; tiles
    of 4 rows force both (and a partial last tile) at N=14."""
    tiled = LaunchConfig(block_rows=4, block_w=8, block_n=16, block_link=4, num_warps=4)
    assert not tiled.one_tile
    pools = random_dnc_pools(4, 14, 6, 2, generator, device=device, link=link)
    pools64 = dnc_to(pools, torch.float64)
    slots = torch.tensor([2, -1, 0], device=device)
    for _ in range(2):
        interface = random_dnc_interface(3, 2, 6, generator, device, link)
        reads = run_step(pools, slots, interface, config=tiled)
        assert_matches_float64(reads, pools, pools64, slots, interface)


@pytest.mark.parametrize(
    ("tiling", "message"),
    [
        ({"block_n": 8}, "must cover the slot"),
        ({"block_w": 4}, "must cover the slot"),
        ({"block_rows": 6}, "block_rows must be a power of two"),
        ({"block_link": 32}, "must be <= block_n"),
    ],
)
def test_a_tiling_that_misses_part_of_the_slot_is_refused(
    generator: torch.Generator, device: torch.device, tiling: dict[str, int], message: str
) -> None:
    if select_backend(device) != "triton":
        pytest.skip("the tiling only exists for the Triton kernel")
    sizes = {"block_rows": 4, "block_w": 8, "block_n": 16, "block_link": 4, "num_warps": 4}
    config = LaunchConfig(**{**sizes, **tiling})
    pools = random_dnc_pools(3, 12, 6, 2, generator, device=device)
    before = dnc_to(pools, torch.float32)
    interface = random_dnc_interface(2, 2, 6, generator, device, True)
    with pytest.raises(ValueError, match=message):
        run_step(pools, torch.tensor([0, 2], device=device), interface, config=config)
    for pool, saved in zip(pools, before, strict=True):
        assert pool is not None and saved is not None and torch.equal(pool, saved)


def test_launch_config_keeps_small_slots_in_one_tile_and_blocks_large_links() -> None:
    small = launch_config(64, 64)
    assert small.one_tile and small.block_link == 64
    large = launch_config(256, 64)
    assert not large.one_tile and large.block_n == 256
    assert large.block_link * large.block_n <= 8192 and large.block_rows * large.block_w <= 8192
    odd = launch_config(12, 5)
    assert (odd.block_n, odd.block_w, odd.one_tile) == (16, 8, True)


def test_bfloat16_pools(generator: torch.Generator, device: torch.device) -> None:
    pools = random_dnc_pools(4, 12, 5, 2, generator, torch.bfloat16, device)
    pools64 = dnc_to(pools, torch.float64)
    slots = torch.tensor([3, 0, -1], device=device)
    interface = random_dnc_interface(3, 2, 5, generator, device)
    reads = run_step(pools, slots, interface)
    assert all(pool is not None and pool.dtype == torch.bfloat16 for pool in pools)
    # Reads are computed in float32 from the exact bfloat16 values; the pools store the
    # float32 results rounded to bfloat16 (8 significant bits).
    assert_matches_float64(reads, pools, pools64, slots, interface, pool_tolerance=1e-2)


def test_allocation_with_ties_and_zeros_matches_sorted_definition(
    generator: torch.Generator, device: torch.device
) -> None:
    """With free gates and the previous write weighting zero the usage stays as set, and with
    both gates open the write weighting is the allocation itself."""
    pools = random_dnc_pools(3, 12, 4, 2, generator, device=device)
    usage = torch.rand(3, 12, generator=generator)
    usage[0, [2, 5, 9]] = float(usage[0, 7])  # a four-way tie
    usage[0, [0, 11]] = 0.0  # two free rows: the lower index takes all
    usage[1, ::3] = 0.5
    usage[1, 1] = 0.0
    usage[2] = 1.0
    usage[2, [4, 8]] = 0.25
    pools.usage.copy_(usage)
    pools.write_weights.zero_()
    interface = random_dnc_interface(3, 2, 4, generator, device)
    interface.free_gates.zero_()
    interface.allocation_gate.fill_(1.0)
    interface.write_gate.fill_(1.0)
    run_step(pools, torch.tensor([0, 1, 2], device=device), interface)
    expected = dnc_reference.allocation_sorted(usage.double())
    assert torch.equal(pools.usage.cpu(), usage)
    assert relative_error(pools.write_weights, expected) < 1e-6
    assert float(pools.write_weights[0, 0]) == 1.0 and float(pools.write_weights[0, 11]) == 0.0


@pytest.mark.parametrize(("direction", "lands_on"), [(2, 2), (0, 0)], ids=["forward", "backward"])
def test_forward_mode_follows_write_order_and_backward_reverses_it(
    device: torch.device, direction: int, lands_on: int
) -> None:
    """Row 0 was written last, row 2 is the only free row: this step writes row 2, links
    0 -> 2, and a head on row 0 reading forward (or on row 2 reading backward) moves along."""
    rows, width = 5, 3
    memory = torch.randn(1, rows, width)
    usage = torch.ones(1, rows)
    usage[0, 2] = 0.0
    precedence = torch.zeros(1, rows)
    precedence[0, 0] = 1.0
    read_weights = torch.zeros(1, 1, rows)
    read_weights[0, 0, 0 if direction == 2 else 2] = 1.0
    pools = dnc_to(
        DNCState(memory, usage, precedence, torch.zeros(1, rows, rows), torch.zeros(1, rows),
                 read_weights),
        torch.float32, device,
    )  # fmt: skip
    modes = torch.zeros(1, 1, 3)
    modes[0, 0, direction] = 1.0
    one = torch.ones(1)
    interface = dnc_to(
        DNCInterface(
            torch.randn(1, 1, width), one.view(1, 1), torch.randn(1, width), one,
            torch.zeros(1, width), torch.randn(1, width), torch.zeros(1, 1), one, one, modes,
        ),
        torch.float32, device,
    )  # fmt: skip
    reads = run_step(pools, torch.tensor([0], device=device), interface)
    assert pools.write_weights.cpu().tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    assert pools.link is not None and pools.precedence is not None
    expected_link = torch.zeros(rows, rows)
    expected_link[2, 0] = 1.0
    assert torch.equal(pools.link[0].cpu(), expected_link)
    assert pools.precedence.cpu().tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    expected = torch.zeros(rows)
    expected[lands_on] = 1.0
    assert torch.equal(pools.read_weights[0, 0].cpu(), expected)
    assert torch.allclose(reads[0, 0], pools.memory[0, lands_on], rtol=1e-6, atol=1e-6)


def test_zero_rows_zero_keys_and_large_strengths_stay_finite(
    generator: torch.Generator, device: torch.device
) -> None:
    pools = random_dnc_pools(3, 12, 4, 2, generator, device=device)
    pools.memory[0, :5] = 0.0
    pools.memory[2] = 0.0
    interface = random_dnc_interface(3, 2, 4, generator, device)
    interface.read_keys[0] = 0.0
    interface.write_key[0] = 0.0
    interface.read_strengths[1] = 1e4
    interface.write_strength[1] = 1e4
    pools64 = dnc_to(pools, torch.float64)
    slots = torch.tensor([0, 1, 2], device=device)
    reads = run_step(pools, slots, interface)
    for tensor in (reads, *pools):
        assert tensor is not None and bool(torch.isfinite(tensor).all())
    # A strength of 1e4 multiplies float32's rounding of a cosine (about 6e-8) into the
    # content weights' logits: relative errors up to about 1e-3 are the format's, not the
    # kernel's (4e-5 seen, in the precedence, for seed 1816593626).
    assert_matches_float64(reads, pools, pools64, slots, interface, 1e-3, 1e-3)


def test_only_padding_rows_change_nothing(generator: torch.Generator, device: torch.device) -> None:
    pools = random_dnc_pools(3, 12, 4, 2, generator, device=device)
    before = dnc_to(pools, torch.float32)
    interface = random_dnc_interface(2, 2, 4, generator, device)
    reads = run_step(pools, torch.tensor([-1, -1], device=device), interface)
    assert torch.equal(reads, torch.zeros_like(reads))
    for pool, original in zip(pools, before, strict=True):
        assert pool is not None and original is not None and torch.equal(pool, original)


def test_forced_torch_backend_agrees_with_default(
    generator: torch.Generator, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools = random_dnc_pools(4, 12, 5, 2, generator, device=device)
    copy = dnc_to(pools, torch.float32)
    slots = torch.tensor([1, 3], device=device)
    interface = random_dnc_interface(2, 2, 5, generator, device)
    reads = run_step(pools, slots, interface)
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    reads_torch = run_step(copy, slots, interface)
    assert relative_error(reads, reads_torch) < 1e-5
    for pool, other in zip(pools, copy, strict=True):
        assert pool is not None and other is not None
        assert relative_error(pool, other) < 1e-5


def _valid_args(device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    pools = random_dnc_pools(4, 6, 3, 2, generator, device=device)
    interface = random_dnc_interface(2, 2, 3, generator, device)
    slots = torch.tensor([2, 0], device=device)
    return {**pools._asdict(), "slots": slots, **interface._asdict()}


def _slots(args: dict[str, Any], values: list[int]) -> torch.Tensor:
    return torch.tensor(values, device=args["memory"].device)


Mutation = Callable[[dict[str, Any]], None]

INVALID: list[tuple[str, Mutation, str]] = [
    ("memory-rank", lambda a: a.update(memory=a["memory"][0]), "memory"),
    ("memory-dtype", lambda a: a.update(memory=a["memory"].double()), "memory"),
    ("memory-strided", lambda a: a.update(memory=a["memory"].transpose(1, 2)), "memory"),
    ("usage-rows", lambda a: a.update(usage=torch.zeros(4, 7)), "usage"),
    ("usage-bf16", lambda a: a.update(usage=a["usage"].bfloat16()), "usage"),
    ("link-shape", lambda a: a.update(link=torch.zeros(4, 6, 5)), "link"),
    ("link-only", lambda a: a.update(precedence=None), "precedence and link"),
    ("link-no-modes", lambda a: a.update(read_modes=None), "read_modes"),
    ("write-weights-capacity", lambda a: a.update(write_weights=torch.zeros(3, 6)), "write_w"),
    ("read-weights-heads", lambda a: a.update(read_weights=torch.zeros(4, 0, 6)), "read_wei"),
    ("read-keys-heads", lambda a: a.update(read_keys=torch.zeros(2, 3, 3)), "read_keys"),
    ("read-strengths-batch", lambda a: a.update(read_strengths=torch.ones(1, 2)), "read_stre"),
    ("write-key-width", lambda a: a.update(write_key=torch.zeros(2, 4)), "write_key"),
    ("write-strength-rank", lambda a: a.update(write_strength=torch.ones(2, 1)), "write_stre"),
    ("erase-dtype", lambda a: a.update(erase=a["erase"].double()), "erase"),
    ("write-vector-strided", lambda a: a.update(write_vector=torch.zeros(3, 2).t()), "write_vec"),
    ("free-gates-shape", lambda a: a.update(free_gates=torch.zeros(2, 3)), "free_gates"),
    ("allocation-gate-half", lambda a: a.update(allocation_gate=torch.ones(2).half()), "alloc"),
    ("write-gate-device", lambda a: a.update(write_gate=a["write_gate"].to("meta")), "write_g"),
    ("read-modes-shape", lambda a: a.update(read_modes=torch.ones(2, 2, 2)), "read_modes"),
    ("slots-dtype", lambda a: a.update(slots=a["slots"].int()), "slots"),
    ("slots-repeat", lambda a: a.update(slots=_slots(a, [1, 1])), "repeat"),
    ("slots-range", lambda a: a.update(slots=_slots(a, [4, 0])), r"\[0, 4\)"),
    ("slots-negative", lambda a: a.update(slots=_slots(a, [-2, 0])), "slots"),
    ("out-shape", lambda a: a.update(out=torch.zeros(2, 2, 4)), "out"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_arguments_raise_and_change_nothing(
    device: torch.device, mutate: Mutation, message: str
) -> None:
    args = _valid_args(device)
    pools = {name: args[name] for name in DNCState._fields}
    before = {name: pool.clone() for name, pool in pools.items()}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        kernels.dnc_memory_step(**args)
    for name, pool in pools.items():
        assert torch.equal(pool, before[name]), name


def test_without_links_read_modes_are_optional(
    generator: torch.Generator, device: torch.device
) -> None:
    """A model without links passes precedence, link and read_modes as None; read modes
    given anyway are ignored."""
    pools = random_dnc_pools(3, 12, 4, 2, generator, device=device, link=False)
    copy = dnc_to(pools, torch.float32)
    slots = torch.tensor([2, 0], device=device)
    interface = random_dnc_interface(2, 2, 4, generator, device, link=False)
    reads = run_step(pools, slots, interface)
    modes = torch.softmax(torch.randn(2, 2, 3, generator=generator), -1).to(device)
    reads_with_modes = run_step(copy, slots, interface._replace(read_modes=modes))
    assert torch.equal(reads, reads_with_modes)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "batch", "link", "pool_dtype"),
    [
        (64, 1024, True, torch.float32),
        (256, 256, True, torch.float32),
        (256, 64, False, torch.float32),
        (64, 512, True, torch.bfloat16),
    ],
)
def test_compiled_kernel_at_serving_sizes(
    generator: torch.Generator, rows: int, batch: int, link: bool, pool_dtype: torch.dtype
) -> None:
    device = torch.device("cuda")
    width, num_read, capacity = 64, 4, batch + 7
    slots = torch.randperm(capacity, generator=generator)[:batch]
    if 0 not in slots.tolist():
        slots[0] = 0  # padding rows are clamped to slot 0 inside the kernel: keep it live
    slots[batch // 2 + 1] = -1
    untouched = sorted(set(range(capacity)) - set(slots.tolist()))
    slot_tensor = slots.to(device)
    pools = random_dnc_pools(capacity, rows, width, num_read, generator, pool_dtype, device, link)
    before = [None if pool is None else pool[untouched].clone() for pool in pools]
    pool_tolerance = 1e-5 if pool_dtype == torch.float32 else 1e-2
    for _ in range(2):
        # The float64 reference starts each step from the kernel's own (possibly bfloat16)
        # pools, so rounding of the stored state does not accumulate into the comparison.
        pools64 = dnc_to(pools, torch.float64)
        interface = random_dnc_interface(batch, num_read, width, generator, device, link)
        reads = run_step(pools, slot_tensor, interface)
        assert_matches_float64(reads, pools, pools64, slot_tensor, interface, pool_tolerance)
    for pool, saved in zip(pools, before, strict=True):
        if pool is not None and saved is not None:
            assert torch.equal(pool[untouched], saved)

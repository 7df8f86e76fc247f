"""The DNC reference (the spec) against an element-by-element reading of the paper's equations,
and its allocation's sort-free product form against the literal sorted definition."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kernels import dnc_reference, reference
from kernels.dnc_reference import DNCInterface, DNCState
from kernels.samples import dnc_to, random_dnc_interface, random_dnc_pools
from tests.conftest import relative_error

Vector = list[float]
Matrix = list[list[float]]


def naive_content(key: Vector, memory: Matrix, strength: float) -> Vector:
    key_norm = math.sqrt(sum(k * k for k in key))
    scores = []
    for row in memory:
        row_norm = math.sqrt(sum(v * v for v in row))
        dot = sum(k * v for k, v in zip(key, row, strict=True))
        scores.append(strength * dot / (key_norm * row_norm + 1e-8))
    peak = max(scores)
    total = sum(math.exp(s - peak) for s in scores)
    return [math.exp(s - peak) / total for s in scores]


def naive_step(state: dict[str, Any], interface: dict[str, Any]) -> tuple[dict[str, Any], Matrix]:
    """One session's DNC step in plain Python floats, straight from the paper's methods."""
    memory: Matrix = state["memory"]
    rows, num_read = len(memory), len(state["read_weights"])
    read_prev: Matrix = state["read_weights"]
    write_prev: Vector = state["write_weights"]
    free: Vector = interface["free_gates"]
    psi = [math.prod(1 - free[i] * read_prev[i][n] for i in range(num_read)) for n in range(rows)]
    usage = [(u + w - u * w) * p for u, w, p in zip(state["usage"], write_prev, psi, strict=True)]
    order = sorted(range(rows), key=lambda n: (usage[n], n))  # phi: ascending, ties by index
    allocation = [0.0] * rows
    running = 1.0
    for n in order:
        allocation[n] = (1 - usage[n]) * running
        running *= usage[n]
    content = naive_content(interface["write_key"], memory, interface["write_strength"])
    gate_a, gate_w = interface["allocation_gate"], interface["write_gate"]
    write = [
        gate_w * (gate_a * a + (1 - gate_a) * c) for a, c in zip(allocation, content, strict=True)
    ]
    erase: Vector = interface["erase"]
    vector: Vector = interface["write_vector"]
    new_memory = [
        [memory[n][m] * (1 - write[n] * erase[m]) + write[n] * vector[m] for m in range(len(erase))]
        for n in range(rows)
    ]
    new_state: dict[str, Any] = {
        "memory": new_memory, "usage": usage, "write_weights": write,
    }  # fmt: skip
    link: Matrix | None = state.get("link")
    if link is not None:
        precedence: Vector = state["precedence"]
        link = [
            [
                0.0 if i == j else (1 - write[i] - write[j]) * link[i][j] + write[i] * precedence[j]
                for j in range(rows)
            ]
            for i in range(rows)
        ]
        total = sum(write)
        new_state["link"] = link
        new_state["precedence"] = [
            (1 - total) * p + w for p, w in zip(precedence, write, strict=True)
        ]
    keys: Matrix = interface["read_keys"]
    strengths: Vector = interface["read_strengths"]
    modes: Matrix | None = interface["read_modes"]
    read_weights = []
    for i in range(num_read):
        read_content = naive_content(keys[i], new_memory, strengths[i])
        if link is None or modes is None:
            read_weights.append(read_content)
            continue
        forward = [sum(link[n][j] * read_prev[i][j] for j in range(rows)) for n in range(rows)]
        backward = [sum(link[j][n] * read_prev[i][j] for j in range(rows)) for n in range(rows)]
        read_weights.append(
            [
                modes[i][0] * backward[n] + modes[i][1] * read_content[n] + modes[i][2] * forward[n]
                for n in range(rows)
            ]
        )
    new_state["read_weights"] = read_weights
    reads = [
        [sum(read_weights[i][n] * new_memory[n][m] for n in range(rows)) for m in range(len(erase))]
        for i in range(num_read)
    ]
    return new_state, reads


@pytest.mark.parametrize(
    ("rows", "width", "num_read", "link"),
    [(7, 3, 2, True), (5, 4, 1, True), (6, 2, 3, False)],
    ids=["N7-R2-link", "N5-R1-link", "N6-R3-nolink"],
)
def test_reference_step_matches_equations(
    generator: torch.Generator, rows: int, width: int, num_read: int, link: bool
) -> None:
    pools = dnc_to(random_dnc_pools(4, rows, width, num_read, generator, link=link), torch.float64)
    interface = dnc_to(
        random_dnc_interface(3, num_read, width, generator, link=link), torch.float64
    )
    slots = torch.tensor([2, -1, 0])
    before = dnc_to(pools, torch.float64)

    reads = dnc_reference.dnc_memory_step(*pools, slots=slots, **interface._asdict())

    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(reads[row], torch.zeros_like(reads[row]))
            continue
        state = {
            name: tensor[slot].tolist()
            for name, tensor in before._asdict().items()
            if tensor is not None
        }
        values = {
            name: None if tensor is None else tensor[row].tolist()
            for name, tensor in interface._asdict().items()
        }
        expected_state, expected_reads = naive_step(state, values)
        assert relative_error(reads[row], torch.tensor(expected_reads, dtype=torch.float64)) < 1e-12
        for name, value in expected_state.items():
            actual = getattr(pools, name)[slot]
            assert relative_error(actual, torch.tensor(value, dtype=torch.float64)) < 1e-12, name
    for pool, original in zip(pools, before, strict=True):
        if pool is not None and original is not None:
            assert torch.equal(pool[[1, 3]], original[[1, 3]])


def test_allocation_product_form_equals_sorted_definition(generator: torch.Generator) -> None:
    usage = torch.rand(6, 9, generator=generator, dtype=torch.float64)
    usage[0, [1, 4, 7]] = float(usage[0, 2])  # a four-way tie
    usage[1, [0, 5]] = 0.0  # two free rows: only the first of them gets anything
    usage[2] = 0.0
    usage[3] = 1.0
    usage[4, ::2] = 0.25
    usage[5, 3] = 0.0
    usage[5, 6] = 1.0
    product = dnc_reference.allocation(usage)
    assert relative_error(product, dnc_reference.allocation_sorted(usage)) < 1e-14
    # float32 as well: the same factors, multiplied in another order
    product32 = dnc_reference.allocation(usage.float())
    assert relative_error(product32, dnc_reference.allocation_sorted(usage)) < 1e-6


def test_allocation_by_hand() -> None:
    usage = torch.tensor([[0.5, 0.5, 0.2], [0.5, 0.0, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # phi = (2, 0, 1): a2 = 0.8, a0 = 0.5 * 0.2, a1 = 0.5 * 0.2 * 0.5 (the tie goes to row 0)
    # phi = (1, 0, 2): a1 = 1, then every product contains u1 = 0
    expected = [[0.1, 0.05, 0.8], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    for form in (dnc_reference.allocation, dnc_reference.allocation_sorted):
        assert torch.allclose(form(usage), torch.tensor(expected, dtype=torch.float64))


def test_allocation_gradient_equals_sorted_form_gradient(generator: torch.Generator) -> None:
    """The product form's gradient is the sorted form's with the sort order held fixed."""
    usage = torch.rand(3, 8, generator=generator, dtype=torch.float64)
    weights = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    gradients = []
    for form in (dnc_reference.allocation, dnc_reference.allocation_sorted):
        leaf = usage.clone().requires_grad_()
        (gradient,) = torch.autograd.grad((form(leaf) * weights).sum(), leaf)
        gradients.append(gradient)
    assert relative_error(gradients[0], gradients[1]) < 1e-12


def test_float32_reference_is_close_to_float64(generator: torch.Generator) -> None:
    pools = random_dnc_pools(5, 20, 6, 2, generator)
    pools64 = dnc_to(pools, torch.float64)
    slots = torch.tensor([4, -1, 0])
    for _ in range(3):
        interface = random_dnc_interface(3, 2, 6, generator)
        reads = dnc_reference.dnc_memory_step(*pools, slots=slots, **interface._asdict())
        interface64 = dnc_to(interface, torch.float64)
        expected = dnc_reference.dnc_memory_step(*pools64, slots=slots, **interface64._asdict())
        assert relative_error(reads, expected) < 1e-5
        for pool, pool64 in zip(pools, pools64, strict=True):
            assert pool is not None and pool64 is not None
            assert relative_error(pool, pool64) < 1e-5


def forward_backward_case(direction: int) -> tuple[DNCState, DNCInterface]:
    """Row 0 was written last (precedence one-hot at 0) and row 2 is the only free row, so
    this step writes row 2 exactly; the read head was on row 0 (direction 2: forward) or
    on row 2 (direction 0: backward), with that read mode alone."""
    rows, width = 4, 3
    memory = torch.randn(1, rows, width, dtype=torch.float64)
    usage = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    precedence = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    link = torch.zeros(1, rows, rows, dtype=torch.float64)
    read_weights = torch.zeros(1, 1, rows, dtype=torch.float64)
    read_weights[0, 0, 0 if direction == 2 else 2] = 1.0
    modes = torch.zeros(1, 1, 3, dtype=torch.float64)
    modes[0, 0, direction] = 1.0
    state = DNCState(
        memory, usage, precedence, link, torch.zeros(1, rows, dtype=torch.float64), read_weights
    )
    one = torch.ones(1, dtype=torch.float64)
    interface = DNCInterface(
        read_keys=torch.randn(1, 1, width, dtype=torch.float64),
        read_strengths=one.view(1, 1),
        write_key=torch.randn(1, width, dtype=torch.float64),
        write_strength=one,
        erase=torch.zeros(1, width, dtype=torch.float64),
        write_vector=torch.randn(1, width, dtype=torch.float64),
        free_gates=torch.zeros(1, 1, dtype=torch.float64),
        allocation_gate=one,
        write_gate=one,
        read_modes=modes,
    )
    return state, interface


@pytest.mark.parametrize(("direction", "lands_on"), [(2, 2), (0, 0)])
def test_forward_mode_follows_write_order_and_backward_reverses_it(
    direction: int, lands_on: int
) -> None:
    state, interface = forward_backward_case(direction)
    new_state, reads = dnc_reference.step(state, interface)
    assert new_state.write_weights.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert new_state.link is not None and new_state.precedence is not None
    assert new_state.link[0, 2, 0] == 1.0  # row 2 was written right after row 0
    assert float(new_state.link.sum()) == 1.0
    assert new_state.precedence.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    expected = torch.zeros(4, dtype=torch.float64)
    expected[lands_on] = 1.0
    assert torch.equal(new_state.read_weights[0, 0], expected)
    assert torch.equal(reads[0, 0], new_state.memory[0, lands_on])


def test_step_is_differentiable(generator: torch.Generator) -> None:
    """Models train through `step`: gradients agree with finite differences."""
    pools = dnc_to(random_dnc_pools(2, 5, 3, 2, generator), torch.float64)
    interface = dnc_to(random_dnc_interface(2, 2, 3, generator), torch.float64)
    state_leaves = tuple(t.clone().requires_grad_() for t in pools if t is not None)
    interface_leaves = tuple(t.clone().requires_grad_() for t in interface if t is not None)

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = DNCState(*tensors[:6])
        new_state, reads = dnc_reference.step(state, DNCInterface(*tensors[6:]))
        return (reads, *(t for t in new_state if t is not None))

    assert torch.autograd.gradcheck(run, state_leaves + interface_leaves, fast_mode=True)


def test_step_without_links_reads_by_content(generator: torch.Generator) -> None:
    pools = dnc_to(random_dnc_pools(2, 6, 4, 2, generator, link=False), torch.float64)
    interface = dnc_to(random_dnc_interface(2, 2, 4, generator, link=False), torch.float64)
    new_state, reads = dnc_reference.step(pools, interface)
    assert new_state.link is None and new_state.precedence is None
    content = reference.content_addressing(
        interface.read_keys, new_state.memory, interface.read_strengths
    )
    assert torch.equal(new_state.read_weights, content)
    assert torch.allclose(reads, content @ new_state.memory, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="both"):
        dnc_reference.step(pools._replace(precedence=torch.zeros(2, 6)), interface)

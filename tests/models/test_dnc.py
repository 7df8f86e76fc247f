"""The DNC: the training forward and the serving step are one model, with and without links."""

from __future__ import annotations

import pytest
import torch

from models.dnc import DNC, DNCConfig
from tests.models.agreement import assert_forward_and_step_agree, fill_random, randomize


def random_dnc(use_links: bool, generator: torch.Generator) -> DNC:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    config = DNCConfig(
        input_size=5,
        output_size=4,
        memory_rows=10,  # not a power of two
        word_size=6,
        read_heads=2,
        controller_size=16,
        controller_layers=2,
        use_links=use_links,
        output_activation="identity",
    )
    model = DNC(config)
    randomize(model, generator)
    return model.eval()


@pytest.mark.parametrize("use_links", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_step_agree_over_100_steps(
    backend: str, use_links: bool, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", backend)
    steps = 100 if backend == "torch" or use_links else 30  # the interpreter is slow
    assert_forward_and_step_agree(random_dnc(use_links, generator), steps, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("use_links", [True, False])
def test_forward_and_step_agree_on_the_gpu(use_links: bool, generator: torch.Generator) -> None:
    """The compiled kernel in the serving step against the training forward on CUDA."""
    model = random_dnc(use_links, generator).to("cuda")
    assert_forward_and_step_agree(model, 100, generator)


def test_state_has_links_only_when_asked(generator: torch.Generator) -> None:
    with_links = {spec.name: spec.shape for spec in random_dnc(True, generator).state_specs()}
    without = {spec.name: spec.shape for spec in random_dnc(False, generator).state_specs()}
    assert with_links["link"] == (10, 10) and with_links["precedence"] == (10,)
    assert "link" not in without and "precedence" not in without
    assert with_links["read_weights"] == (2, 10) and with_links["memory"] == (10, 6)
    assert {"reads", "h", "c", "usage", "write_weights"} <= without.keys()


def test_the_first_write_goes_to_row_0_by_allocation(generator: torch.Generator) -> None:
    """Fresh state: usage is zero, so allocation picks row 0 (ties broken by index)."""
    model = random_dnc(True, generator)
    with torch.no_grad():
        model.initial_memory.zero_()
        model.interface.bias.zero_()
        model.interface.weight.zero_()
        # allocation gate and write gate fully open
        sizes = model.split_sizes
        gates = sum(sizes[:7])
        model.interface.bias[gates : gates + 2] = 30.0
    pool = model.new_pool(2)
    fill_random(pool, generator)
    model.reset(pool, [1])
    model.step(pool, torch.tensor([1]), torch.randn(1, 5, generator=generator))
    expected = torch.zeros(10)
    expected[0] = 1
    assert torch.allclose(pool["write_weights"][1], expected, atol=1e-6)

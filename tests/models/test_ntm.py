"""The NTM: the training forward and the serving step are one model."""

from __future__ import annotations

import pytest
import torch

from models.ntm import NTM, NTMConfig
from tests.models.agreement import assert_forward_and_step_agree, fill_random, randomize

CONFIG = NTMConfig(
    input_size=5,
    output_size=4,
    memory_rows=12,  # not a power of two
    memory_width=6,
    read_heads=2,
    write_heads=1,
    shift_radius=1,
    controller_size=16,
    controller_layers=2,
    output_activation="identity",
)


def random_ntm(config: NTMConfig, generator: torch.Generator) -> NTM:
    """An NTM whose weights and initial state are all random, with sharp enough addressing."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = NTM(config)
    randomize(model, generator)
    return model.eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_step_agree_over_100_steps(
    backend: str, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """100 steps on the pool through the kernel (here `backend`) match the training forward."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", backend)
    assert_forward_and_step_agree(random_ntm(CONFIG, generator), 100, generator)


@pytest.mark.gpu
def test_forward_and_step_agree_on_the_gpu(generator: torch.Generator) -> None:
    """The compiled kernel in the serving step against the training forward on CUDA."""
    model = random_ntm(CONFIG, generator).to("cuda")
    assert_forward_and_step_agree(model, 100, generator)


def test_a_sigmoid_model_outputs_probabilities(generator: torch.Generator) -> None:
    config = NTMConfig(input_size=3, output_size=2, memory_rows=8, memory_width=4)
    model = random_ntm(config, generator)
    inputs = torch.randn(2, 7, 3, generator=generator)
    with torch.no_grad():
        assert torch.allclose(model(inputs), torch.sigmoid(model(inputs, activate=False)))
        pool = model.new_pool(2)
        model.reset(pool, [0, 1])
        out = model.step(pool, torch.tensor([0, 1]), inputs[:, 0])
    assert bool(((out > 0) & (out < 1)).all())


def test_a_bad_step_is_refused_and_changes_nothing(generator: torch.Generator) -> None:
    model = random_ntm(CONFIG, generator)
    pool = model.new_pool(3)
    fill_random(pool, generator)
    before = {name: pool[name].clone() for name in pool}
    good_inputs = torch.randn(2, CONFIG.input_size, generator=generator)
    cases = [
        (torch.tensor([0, 0]), good_inputs, "must not repeat"),
        (torch.tensor([0, 3]), good_inputs, r"slots must be -1 \(padding\) or in \[0, 3\)"),
        (torch.tensor([-2, 1]), good_inputs, r"slots must be -1 \(padding\) or in \[0, 3\)"),
        (torch.tensor([0, 1], dtype=torch.int32), good_inputs, "slots must be 1-D int64"),
        (
            torch.tensor([0, 1]),
            good_inputs[:, :-1],
            r"inputs must be a float tensor of shape \[2, 5\]",
        ),
        (torch.tensor([0, 1]), good_inputs.long(), "inputs must be a float tensor"),
        (torch.tensor([0, 1]), good_inputs * torch.tensor([[1.0], [float("nan")]]), "NaN or Inf"),
    ]
    for slots, inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.step(pool, slots, inputs)
        for name in pool:
            assert torch.equal(pool[name], before[name])
    other = NTM(NTMConfig(input_size=5, output_size=4, memory_rows=8, memory_width=6))
    with pytest.raises(ValueError, match="not made for this model"):
        model.step(other.new_pool(3), torch.tensor([0, 1]), good_inputs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_rows": 0}, "memory_rows must be >= 1"),
        ({"read_heads": 0, "write_heads": 0}, "at least one head"),
        ({"shift_radius": 4}, "shift_radius must be in 0..3"),
        ({"output_activation": "tanh"}, "output_activation must be one of"),
    ],
)
def test_invalid_hyperparameters_are_named(change: dict[str, object], message: str) -> None:
    arguments = {"input_size": 3, "output_size": 2, **change}
    with pytest.raises(ValueError, match=message):
        NTMConfig(**arguments)  # type: ignore[arg-type]


def test_state_description_matches_the_pool_and_the_initial_state() -> None:
    model = NTM(CONFIG)
    specs = {spec.name: spec for spec in model.state_specs()}
    assert specs["memory"].shape == (12, 6)
    assert specs["weights"].shape == (3, 12)
    assert specs["h"].shape == (2, 16)
    initial = model.initial_state()
    assert {name: tuple(t.shape) for name, t in initial.items()} == {
        name: spec.shape for name, spec in specs.items()
    }
    assert model.state_bytes == 4 * (12 * 6 + 3 * 12 + 2 * 6 + 2 * 2 * 16)
    # every head starts on row 0; the memory starts at the small constant
    assert torch.equal(initial["weights"][:, 0], torch.ones(3))
    assert torch.equal(initial["memory"], torch.full((12, 6), CONFIG.memory_init))

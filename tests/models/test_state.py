"""StatePool: the generic slot operations every model's serving relies on."""

from __future__ import annotations

import pytest
import torch

from models.state import StatePool, StateSpec, complete_state, state_bytes, validate_state

SPECS = (StateSpec("memory", (5, 3)), StateSpec("h", (2, 4)), StateSpec("count", (1,), torch.int64))


def random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "memory": torch.randn(5, 3, generator=generator),
        "h": torch.randn(2, 4, generator=generator),
        "count": torch.randint(0, 100, (1,), generator=generator),
    }


def test_bytes_count_every_element_at_its_dtype() -> None:
    assert state_bytes(SPECS) == 5 * 3 * 4 + 2 * 4 * 4 + 1 * 8
    assert StatePool(SPECS, 3).bytes_per_session == state_bytes(SPECS)


def test_write_read_copy_touch_only_their_slots(generator: torch.Generator) -> None:
    pool = StatePool(SPECS, 4)
    states = [random_state(generator) for _ in range(4)]
    for slot, state in enumerate(states):
        pool.write(slot, state)
    snapshot = pool.read(2)
    for name in pool:
        assert torch.equal(snapshot[name], states[2][name])
        assert pool[name].shape == (4, *snapshot[name].shape)
    snapshot["memory"].add_(1)  # a snapshot is a copy, not a view
    assert torch.equal(pool["memory"][2], states[2]["memory"])

    before = {name: pool[name].clone() for name in pool}
    pool.copy(1, 3)
    for name in pool:
        assert torch.equal(pool[name][3], states[1][name])
        assert torch.equal(pool[name][:3], before[name][:3])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("h"), "missing \\['h'\\]"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda s: s.update(h=torch.zeros(2, 5)), "'h' must be torch.float32 \\[2, 4\\]"),
        (lambda s: s.update(h=torch.zeros(2, 4, dtype=torch.float64)), "'h' must be"),
        (lambda s: s["memory"].__setitem__((0, 0), float("nan")), "'memory' holds NaN"),
    ],
)
def test_a_bad_state_is_refused_and_changes_nothing(
    generator: torch.Generator, change: object, message: str
) -> None:
    pool = StatePool(SPECS, 2)
    pool.write(0, random_state(generator))
    before = {name: pool[name].clone() for name in pool}
    state = random_state(generator)
    change(state)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        pool.write(0, state)
    for name in pool:
        assert torch.equal(pool[name], before[name])


def test_slots_outside_the_pool_are_refused() -> None:
    pool = StatePool(SPECS, 2)
    with pytest.raises(ValueError, match="slot 2 is outside the pool"):
        pool.read(2)
    with pytest.raises(ValueError, match="slot -1 is outside"):
        pool.copy(0, -1)
    with pytest.raises(ValueError, match="capacity >= 1"):
        StatePool(SPECS, 0)
    with pytest.raises(ValueError, match="unique"):
        StatePool((*SPECS, StateSpec("h", (1,))), 1)


def test_complete_state_zeros_only_the_tensors_added_later() -> None:
    """A state without a `zero_if_missing` tensor gets zeros of its shape and dtype; one
    without any other tensor is still refused; a tensor already there is kept as it is."""
    specs = (
        StateSpec("memory", (2, 3)),
        StateSpec("said", (4,), torch.bool, zero_if_missing=True),
    )
    memory = torch.ones(2, 3)
    completed = complete_state(specs, {"memory": memory})
    validate_state(specs, completed)
    assert completed["memory"] is memory
    assert completed["said"].dtype == torch.bool and not bool(completed["said"].any())
    said = torch.tensor([True, False, True, False])
    assert complete_state(specs, {"memory": memory, "said": said})["said"] is said
    with pytest.raises(ValueError, match=r"missing \['memory'\]"):
        validate_state(specs, complete_state(specs, {"said": said}))

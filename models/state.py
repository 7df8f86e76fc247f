"""Per-session state, described once by each model and handled generically from there.

A model lists its per-session tensors as `StateSpec`s (name, shape, dtype). `StatePool`
allocates each of them once as `[capacity, *shape]` and does everything a server needs with
slots of it: reset a slot to the model's initial state, copy one slot to another (fork),
take a snapshot of a slot to host memory (parking, export) and put one back (restore,
import). Nothing here knows which model it holds, so the NTM, the DNC and the VMED share it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StateSpec:
    """One per-session tensor: its name, its shape for one session, and its dtype.
    `zero_if_missing`: a tensor added to the model's state after states of it were exported
    or stored; `complete_state` gives such a state zeros for it, so that it still loads."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    zero_if_missing: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes for one session."""
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def state_bytes(specs: Sequence[StateSpec]) -> int:
    """Bytes of state one session takes."""
    return sum(spec.nbytes for spec in specs)


def complete_state(specs: Sequence[StateSpec], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` with zeros for each tensor it lacks whose spec is `zero_if_missing` (a state
    exported or stored before that tensor was added); nothing else is changed or checked."""
    completed = dict(state)
    for spec in specs:
        if spec.zero_if_missing and spec.name not in completed:
            completed[spec.name] = torch.zeros(spec.shape, dtype=spec.dtype)
    return completed


def validate_state(specs: Sequence[StateSpec], state: Mapping[str, Tensor]) -> None:
    """Raise ValueError unless `state` has exactly the tensors `specs` describe, finite."""
    expected = {spec.name for spec in specs}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"session state must hold tensors {sorted(expected)}; "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for spec in specs:
        tensor = state[spec.name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"state tensor {spec.name!r} must be {spec.dtype} {list(spec.shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"state tensor {spec.name!r} holds NaN or Inf")


class StatePool:
    """Every per-session tensor of one model, allocated once for `capacity` slots.

    `pool[name]` is the `[capacity, *shape]` tensor that kernels update in place at the
    slots of a batch. Slots are plain indices; which slot belongs to which session is the
    caller's business (the serving layer's session table).
    """

    def __init__(
        self, specs: Sequence[StateSpec], capacity: int, device: torch.device | str = "cpu"
    ) -> None:
        if capacity < 1:
            raise ValueError(f"a state pool needs capacity >= 1, got {capacity}")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"state names must be unique, got {names}")
        self.specs = tuple(specs)
        self.capacity = capacity
        self.device = torch.device(device)
        self.tensors = {
            spec.name: torch.zeros((capacity, *spec.shape), dtype=spec.dtype, device=self.device)
            for spec in self.specs
        }

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def bytes_per_session(self) -> int:
        """Bytes of state one slot holds."""
        return state_bytes(self.specs)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside the pool (capacity {self.capacity})")

    def write(self, slot: int, state: Mapping[str, Tensor]) -> None:
        """Put a whole session state (a snapshot, an initial state, an import) into a slot.

        Validates everything before writing anything, so a bad state changes no slot.
        """
        self._check_slot(slot)
        validate_state(self.specs, state)
        for name, tensor in self.tensors.items():
            tensor[slot].copy_(state[name])

    def read(self, slot: int) -> dict[str, Tensor]:
        """A host-memory copy of one slot's state (for parking, snapshots and export)."""
        self._check_slot(slot)
        return {name: tensor[slot].to("cpu", copy=True) for name, tensor in self.tensors.items()}

    def copy(self, source: int, destination: int) -> None:
        """Copy one slot's state into another (forking a session)."""
        self._check_slot(source)
        self._check_slot(destination)
        for tensor in self.tensors.values():
            tensor[destination].copy_(tensor[source])

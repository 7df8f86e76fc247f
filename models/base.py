"""What every memserve model is: one set of weights with two paths over the same equations.

`forward(inputs)` runs whole sequences `[B, T, input_size]` from the initial state with the
differentiable reference pieces, for training. `step(pool, slots, inputs)` advances the
sessions held in `slots` of a `StatePool` by one step each, in place, with the fused
kernels, for serving. A model also describes its per-session state (`state_specs`) and
provides the initial state of a new session (`initial_state`); the pool, snapshots and
checkpoints are generic over that description.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kernels.launch import all_finite, validate_slots
from models.state import StatePool, StateSpec, state_bytes


def on_live_rows(
    slots: Tensor,
    rows: tuple[Tensor, ...],
    width: int,
    run: Callable[..., Tensor],
) -> Tensor:
    """`run(live_slots, *live_rows)` for the rows whose slot is not padding (-1), scattered
    into a zeroed `[B, width]` float32 result (a padding row gets zeros). Finding the live
    rows costs a device sync; the trusted serving path has no padding and skips this."""
    live = torch.nonzero(slots >= 0).flatten()
    if live.numel() == slots.shape[0]:
        return run(slots, *rows)
    outputs = torch.zeros(slots.shape[0], width, dtype=torch.float32, device=slots.device)
    if live.numel():
        outputs[live] = run(slots[live], *(row[live] for row in rows))
    return outputs


def require_positive(config: object, *names: str) -> None:
    """Raise ValueError naming the first of the config's fields `names` that is below 1."""
    kind = type(config).__name__.removesuffix("Config")
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{kind} {name} must be >= 1, got {value}")


class MemoryModel(nn.Module, ABC):
    """Base of the served models. Subclasses set `model_type` and a `config` dataclass."""

    model_type: ClassVar[str]
    config: Any  # a dataclass of hyperparameters; `hyperparameters()` serialises it
    # Files a checkpoint keeps beside config.json and the weights (a tokenizer, ...).
    extra_file_names: ClassVar[tuple[str, ...]] = ()
    # Where a loaded checkpoint came from (its config.json "provenance"); empty otherwise.
    provenance: dict[str, Any]
    # SHA-256 of the checkpoint's weights file, set by `checkpoint.load`; empty otherwise.
    weights_digest: str

    def __init__(self) -> None:
        super().__init__()
        self.provenance = {}
        self.weights_digest = ""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Width of one input step."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Width of one output step."""

    @abstractmethod
    def state_specs(self) -> tuple[StateSpec, ...]:
        """The per-session state: every tensor a slot holds between steps."""

    @abstractmethod
    def initial_state(self) -> dict[str, Tensor]:
        """The state of a new session, one tensor per spec (detached, on the model's device)."""

    @abstractmethod
    def forward(self, inputs: Tensor, activate: bool = True) -> Tensor:
        """Outputs `[B, T, output_size]` for inputs `[B, T, input_size]` from the initial state;
        `activate=False` gives them before the output activation (logits, for the loss)."""

    @abstractmethod
    def step(self, pool: StatePool, slots: Tensor, inputs: Tensor, check: bool = True) -> Tensor:
        """Advance the sessions in `slots` (int64 `[B]`, unique, -1 = padding) by one step.

        inputs `[B, input_size]` -> outputs `[B, output_size]` (zeros for padding rows); the
        pool's slots are updated in place and no other slot is touched.

        `check=False` is the serving worker's trusted path: the caller guarantees what the
        checks would verify (slots unique and inside the pool, inputs finite and of the
        right shape) and that no row is padding, and nothing waits on the device.
        """

    def extra_files(self) -> dict[str, bytes]:
        """The contents of each of `extra_file_names`, for a checkpoint to write."""
        return {}

    def load_extra_file(self, name: str, data: bytes) -> None:
        """Take back one of `extra_file_names` from a checkpoint; raise ValueError, saying
        what is wrong, for contents this model cannot use."""
        raise ValueError(f"{self.model_type} models keep no file {name!r}")

    def hyperparameters(self) -> dict[str, Any]:
        """The config as plain JSON values (what `config.json` stores)."""
        return asdict(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def memory_shape(self) -> tuple[int, ...]:
        """The external memory's shape for one session, `(N, M)` (the state named "memory")."""
        return next(spec.shape for spec in self.state_specs() if spec.name == "memory")

    @property
    def state_bytes(self) -> int:
        """Bytes of state one session takes on the server."""
        return state_bytes(self.state_specs())

    def new_pool(self, capacity: int, device: torch.device | str | None = None) -> StatePool:
        """A state pool for `capacity` sessions of this model (slots start zeroed: reset them)."""
        return StatePool(self.state_specs(), capacity, device or self.device)

    @torch.no_grad()
    def reset(self, pool: StatePool, slots: Sequence[int]) -> None:
        """Put the initial state into each of `slots` (a new session)."""
        initial = {name: tensor.to(pool.device) for name, tensor in self.initial_state().items()}
        for slot in slots:
            pool.write(slot, initial)

    def check_step_inputs(self, pool: StatePool, slots: Tensor, inputs: Tensor) -> None:
        """Raise ValueError, naming the argument, for a step this model cannot take."""
        if slots.dim() != 1 or slots.dtype != torch.int64:
            raise ValueError(f"slots must be 1-D int64, got {slots.dtype} {list(slots.shape)}")
        expected = [slots.shape[0], self.input_size]
        if list(inputs.shape) != expected or not inputs.is_floating_point():
            raise ValueError(
                f"inputs must be a float tensor of shape {expected}, "
                f"got {inputs.dtype} {list(inputs.shape)}"
            )
        validate_slots(slots, pool.capacity)
        if not all_finite(inputs):
            raise ValueError("inputs hold NaN or Inf")
        if pool.specs != self.state_specs():
            raise ValueError("the pool was not made for this model (its state specs differ)")

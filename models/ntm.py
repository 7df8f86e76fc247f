"""The Neural Turing Machine (Graves, Wayne and Danihelka, 2014) with an LSTM controller.

Each step the controller reads `[x_t; reads_{t-1}]`; a linear interface layer turns its top
hidden state into the parameters of R read heads and W write heads, activated as in the
paper (key and add as they are, beta = softplus, gate = sigmoid, shift = softmax over 2K+1,
gamma = 1 + softplus, erase = sigmoid); every head addresses the memory as it was before the
step, the read heads read it, the write heads then erase and add; the output layer maps
`[h_t; reads_t]` to the output, through a sigmoid for bit tasks.

Initial state, saved with the model: the memory is the constant `memory_init` (1e-6: Collier
and Beel, ICANN 2018, found a small constant initialisation trains fastest and most stably),
every head starts focused on row 0 (so location-based addressing has a place to start from),
and the initial reads and controller state are learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kernels import ntm_memory_step, reference
from kernels.ntm import MAX_SHIFT_RADIUS
from models.activations import sigmoid, softplus
from models.base import require_positive
from models.controller import OUTPUT_ACTIVATIONS, ControllerMemoryModel
from models.state import StatePool, StateSpec


@dataclass(frozen=True)
class NTMConfig:
    """Every hyperparameter of an NTM; `config.json` stores exactly these fields."""

    input_size: int
    output_size: int
    memory_rows: int = 128  # N
    memory_width: int = 20  # M
    read_heads: int = 1  # R
    write_heads: int = 1  # W
    shift_radius: int = 1  # K: shifts by -K..K
    controller_size: int = 100
    controller_layers: int = 1
    output_activation: str = "sigmoid"
    memory_init: float = 1e-6

    def __post_init__(self) -> None:
        require_positive(
            self, "input_size", "output_size", "memory_rows", "memory_width",
            "controller_size", "controller_layers",
        )  # fmt: skip
        if self.read_heads < 0 or self.write_heads < 0 or self.read_heads + self.write_heads < 1:
            raise ValueError(
                f"NTM needs read_heads >= 0, write_heads >= 0 and at least one head, got "
                f"{self.read_heads} and {self.write_heads}"
            )
        if not 0 <= self.shift_radius <= MAX_SHIFT_RADIUS:
            raise ValueError(
                f"NTM shift_radius must be in 0..{MAX_SHIFT_RADIUS}, got {self.shift_radius}"
            )
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"NTM output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                f"got {self.output_activation!r}"
            )


class HeadParameters(NamedTuple):
    """Activated head parameters for one step, in the order the memory kernel takes them."""

    keys: Tensor  # [B, R+W, M]
    beta: Tensor  # [B, R+W]
    gate: Tensor  # [B, R+W]
    shift: Tensor  # [B, R+W, 2K+1]
    gamma: Tensor  # [B, R+W]
    erase: Tensor  # [B, W, M]
    add: Tensor  # [B, W, M]


class NTM(ControllerMemoryModel):
    """An NTM whose `forward` trains with autograd and whose `step` serves from a state pool."""

    model_type: ClassVar[str] = "ntm"
    config: NTMConfig
    initial_memory: Tensor  # buffers, saved with the weights
    initial_weights: Tensor

    def __init__(self, config: NTMConfig) -> None:
        N, M = config.memory_rows, config.memory_width
        R, W, K = config.read_heads, config.write_heads, config.shift_radius
        head_width = M + 4 + 2 * K  # key, beta, gate, 2K+1 shift weights, gamma
        super().__init__(
            input_size=config.input_size,
            output_size=config.output_size,
            read_heads=R,
            read_width=M,
            controller_size=config.controller_size,
            controller_layers=config.controller_layers,
            interface_size=(R + W) * head_width + W * 2 * M,
            output_activation=config.output_activation,
        )
        self.config = config
        self.heads, self.head_width = R + W, head_width
        self.register_buffer("initial_memory", torch.full((N, M), config.memory_init))
        initial_weights = torch.zeros(self.heads, N)
        initial_weights[:, 0] = 1.0
        self.register_buffer("initial_weights", initial_weights)

    def memory_specs(self) -> tuple[StateSpec, ...]:
        c = self.config
        return (
            StateSpec("memory", (c.memory_rows, c.memory_width)),
            StateSpec("weights", (self.heads, c.memory_rows)),
        )

    def initial_memory_state(self) -> dict[str, Tensor]:
        return {"memory": self.initial_memory, "weights": self.initial_weights}

    def head_parameters(self, interface: Tensor) -> HeadParameters:
        """Split the interface vector `[B, size]` into the heads' activated parameters."""
        batch = interface.shape[0]
        M, W, K = self.config.memory_width, self.config.write_heads, self.config.shift_radius
        split = self.heads * self.head_width

        def parts(vector: Tensor) -> tuple[Tensor, ...]:
            """keys, beta, gate, shift, gamma (per head), then erase and add (per write head)."""
            by_head = vector[:, :split].view(batch, self.heads, self.head_width)
            addressing = torch.split(by_head, [M, 1, 1, 2 * K + 1, 1], dim=-1)
            return (*addressing, *vector[:, split:].view(batch, W, 2 * M).chunk(2, -1))

        # Each activation runs once over the whole vector and the parameters are read from it:
        # an element's bits are its own (`models.activations`), and one call costs a fraction
        # of one per parameter on a small batch.
        raw, squashed, positive = (
            parts(interface),
            parts(sigmoid(interface)),
            parts(softplus(interface)),
        )
        return HeadParameters(
            keys=raw[0],
            beta=positive[1].squeeze(-1),
            gate=squashed[2].squeeze(-1),
            shift=torch.softmax(raw[3], dim=-1),
            gamma=1 + positive[4].squeeze(-1),
            erase=squashed[5],
            add=raw[6],
        )

    def memory_forward(
        self, state: dict[str, Tensor], interface: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        p = self.head_parameters(interface)
        memory, R = state["memory"], self.config.read_heads
        weights = reference.address(memory, state["weights"], *p[:5])
        reads = reference.read(memory, weights[:, :R])
        memory = reference.write(memory, weights[:, R:], p.erase, p.add)
        return {"memory": memory, "weights": weights}, reads

    def fused_layout(self) -> tuple[str, dict[str, int], tuple[str | None, ...]]:
        c = self.config
        sizes = {
            "N": c.memory_rows, "M": c.memory_width, "NREAD": c.read_heads,
            "NWRITE": c.write_heads, "SHIFT": c.shift_radius,
        }  # fmt: skip
        return "ntm", sizes, ("memory", "weights", "reads", "h", "c")

    def memory_step(self, pool: StatePool, slots: Tensor, interface: Tensor) -> Tensor:
        params = (t.contiguous() for t in self.head_parameters(interface))  # split views
        return ntm_memory_step(
            pool["memory"], pool["weights"], slots, *params, check_slots=False
        )  # the slots were checked by `step`

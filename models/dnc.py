"""The Differentiable Neural Computer (Graves et al., Nature 2016) with an LSTM controller.

The controller and its reads work as in the NTM (`models.controller`); the memory adds
dynamic allocation by usage and, optionally, a temporal link matrix that lets the read heads
walk forward or backward through the order in which rows were written. The interface vector
is split and activated as in the paper's methods: keys as they are, strengths through
oneplus (1 + softplus), erase, free, allocation and write gates through a sigmoid, the read
modes through a softmax over (backward, content, forward).

Initial state, saved with the model: the memory is the constant `memory_init`, usage,
precedence, links and weightings are zero (so the first write goes to row 0 by allocation),
and the initial reads and controller state are learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kernels import dnc_memory_step
from kernels.dnc_reference import DNCInterface, DNCState, step
from models.activations import oneplus, sigmoid
from models.base import require_positive
from models.controller import OUTPUT_ACTIVATIONS, ControllerMemoryModel
from models.state import StatePool, StateSpec


@dataclass(frozen=True)
class DNCConfig:
    """Every hyperparameter of a DNC; `config.json` stores exactly these fields."""

    input_size: int
    output_size: int
    memory_rows: int = 64  # N
    word_size: int = 32  # W
    read_heads: int = 4  # R
    controller_size: int = 128
    controller_layers: int = 1
    use_links: bool = True  # False: no temporal links, content reads only, no N x N state
    output_activation: str = "sigmoid"
    memory_init: float = 1e-6

    def __post_init__(self) -> None:
        require_positive(
            self, "input_size", "output_size", "memory_rows", "word_size", "read_heads",
            "controller_size", "controller_layers",
        )  # fmt: skip
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"DNC output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                f"got {self.output_activation!r}"
            )


# The DNC memory as functions of its sizes, shared by the DNC and the VMED's encoder.


def interface_split_sizes(read_heads: int, word_size: int, use_links: bool) -> list[int]:
    """Widths of the interface vector's parts, in `split_interface`'s order."""
    R, W = read_heads, word_size
    # read keys and strengths, write key and strength, erase, write vector, free gates,
    # allocation and write gates, and with links the read modes
    return [R * W, R, W, 1, W, W, R, 1, 1] + ([3 * R] if use_links else [])


def split_interface(
    interface: Tensor, read_heads: int, word_size: int, use_links: bool
) -> DNCInterface:
    """Split the interface vector `[B, size]` and activate each part."""
    batch, R, W = interface.shape[0], read_heads, word_size
    sizes = interface_split_sizes(R, W, use_links)
    parts = torch.split(interface, sizes, dim=-1)
    # Each activation runs once over the whole vector and the parts are read from it: an
    # element's bits are its own (`models.activations`), and one call costs a fraction of
    # one per part on a small batch.
    squashed = torch.split(sigmoid(interface), sizes, dim=-1)
    strengths = torch.split(oneplus(interface), sizes, dim=-1)
    read_modes = torch.softmax(parts[9].view(batch, R, 3), dim=-1) if use_links else None
    return DNCInterface(
        read_keys=parts[0].reshape(batch, R, W),
        read_strengths=strengths[1],
        write_key=parts[2],
        write_strength=strengths[3].squeeze(-1),
        erase=squashed[4],
        write_vector=parts[5],
        free_gates=squashed[6],
        allocation_gate=squashed[7].squeeze(-1),
        write_gate=squashed[8].squeeze(-1),
        read_modes=read_modes,
    )


def dnc_memory_specs(
    memory_rows: int, word_size: int, read_heads: int, use_links: bool
) -> tuple[StateSpec, ...]:
    """The DNC memory's per-session state (the names `dnc_pool_step` reads the pool by)."""
    N, W, R = memory_rows, word_size, read_heads
    links = (StateSpec("precedence", (N,)), StateSpec("link", (N, N)))
    return (
        StateSpec("memory", (N, W)),
        StateSpec("usage", (N,)),
        *(links if use_links else ()),
        StateSpec("write_weights", (N,)),
        StateSpec("read_weights", (R, N)),
    )


def dnc_state_step(
    state: dict[str, Tensor], parameters: DNCInterface
) -> tuple[dict[str, Tensor], Tensor]:
    """One differentiable memory step on a batch's state (named as in `dnc_memory_specs`)."""
    memory_state = DNCState(
        state["memory"],
        state["usage"],
        state.get("precedence"),
        state.get("link"),
        state["write_weights"],
        state["read_weights"],
    )
    new_state, reads = step(memory_state, parameters)
    new = {name: value for name, value in new_state._asdict().items() if value is not None}
    return new, reads


def dnc_pool_step(
    pool: StatePool, slots: Tensor, parameters: DNCInterface, use_links: bool
) -> Tensor:
    """One memory step in place at `slots` of `pool` (checked by the caller); returns reads."""
    p = parameters
    return dnc_memory_step(
        pool["memory"],
        pool["usage"],
        pool["precedence"] if use_links else None,
        pool["link"] if use_links else None,
        pool["write_weights"],
        pool["read_weights"],
        slots,
        # the split views are strided; the kernel takes contiguous rows
        p.read_keys.contiguous(),
        p.read_strengths.contiguous(),
        p.write_key.contiguous(),
        p.write_strength.contiguous(),
        p.erase.contiguous(),
        p.write_vector.contiguous(),
        p.free_gates.contiguous(),
        p.allocation_gate.contiguous(),
        p.write_gate.contiguous(),
        None if p.read_modes is None else p.read_modes.contiguous(),
        check_slots=False,
    )


class DNC(ControllerMemoryModel):
    """A DNC whose `forward` trains with autograd and whose `step` serves from a state pool."""

    model_type: ClassVar[str] = "dnc"
    config: DNCConfig
    initial_memory: Tensor  # a buffer, saved with the weights

    def __init__(self, config: DNCConfig) -> None:
        R, W = config.read_heads, config.word_size
        self.split_sizes = interface_split_sizes(R, W, config.use_links)
        super().__init__(
            input_size=config.input_size,
            output_size=config.output_size,
            read_heads=R,
            read_width=W,
            controller_size=config.controller_size,
            controller_layers=config.controller_layers,
            interface_size=sum(self.split_sizes),
            output_activation=config.output_activation,
        )
        self.config = config
        self.register_buffer(
            "initial_memory", torch.full((config.memory_rows, W), config.memory_init)
        )

    def memory_specs(self) -> tuple[StateSpec, ...]:
        c = self.config
        return dnc_memory_specs(c.memory_rows, c.word_size, c.read_heads, c.use_links)

    def initial_memory_state(self) -> dict[str, Tensor]:
        state = {"memory": self.initial_memory}
        for spec in self.memory_specs()[1:]:
            state[spec.name] = self.initial_memory.new_zeros(spec.shape)
        return state

    def interface_parameters(self, interface: Tensor) -> DNCInterface:
        """Split the interface vector `[B, size]` and activate each part."""
        c = self.config
        return split_interface(interface, c.read_heads, c.word_size, c.use_links)

    def memory_forward(
        self, state: dict[str, Tensor], interface: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        return dnc_state_step(state, self.interface_parameters(interface))

    def fused_layout(self) -> tuple[str, dict[str, int], tuple[str | None, ...]]:
        c = self.config
        sizes = {"N": c.memory_rows, "WS": c.word_size, "NREAD": c.read_heads,
                 "LINKS": int(c.use_links)}  # fmt: skip
        links = ("precedence", "link") if c.use_links else (None, None)
        names = ("memory", "usage", *links, "write_weights", "read_weights", "reads", "h", "c")
        return "dnc", sizes, names

    def memory_step(self, pool: StatePool, slots: Tensor, interface: Tensor) -> Tensor:
        # slots are checked by `step`
        return dnc_pool_step(
            pool, slots, self.interface_parameters(interface), self.config.use_links
        )

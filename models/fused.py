"""A controller-memory model's weights packed for the fused CPU step (`kernels.cpu_step`),
and the step itself, kept per state pool.

The packing: each LSTM layer's `weight_ih` and `weight_hh` side by side and transposed
(`[inputs + hidden, 4 hidden]`, one product per layer instead of two), its two biases
summed; the interface and output layers transposed; every one padded with zero columns to
a multiple of 16. A pool's step is built once and rebuilt only when a parameter changes (a
training step) or the pool's tensors are replaced. Packing copies the weights: a model
stepped on a CPU holds them twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kernels.backend import use_fused_cpu_step
from kernels.cpu_step import BuildError, FusedStep
from models.state import StatePool


class ControllerMemoryModel(Protocol):
    """What is packed: `models.controller.ControllerMemoryModel` (which imports this)."""

    controller: Any  # models.controller.LSTMController
    interface: nn.Linear
    output: nn.Linear
    config: Any  # has output_activation

    @property
    def input_size(self) -> int: ...
    @property
    def output_size(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...
    def fused_layout(self) -> tuple[str, dict[str, int], tuple[str | None, ...]]: ...


LANES = 16  # the sources' column padding (cell.h: LANES)


def _padded(matrix: Tensor) -> Tensor:
    """`matrix` with zero columns appended up to a multiple of LANES, contiguous float32."""
    columns = -(-matrix.shape[-1] // LANES) * LANES
    out = matrix.new_zeros(*matrix.shape[:-1], columns, dtype=torch.float32)
    out[..., : matrix.shape[-1]] = matrix
    return out.contiguous()


def packed_parameters(model: ControllerMemoryModel) -> list[Tensor]:
    """Per layer its weight and bias, then the interface layer's and the output layer's."""
    packed: list[Tensor] = []
    for cell in model.controller.cells:
        assert isinstance(cell, nn.LSTMCell)
        weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1).t()
        bias = (
            cell.bias_ih + cell.bias_hh
            if cell.bias_ih is not None and cell.bias_hh is not None
            else weight.new_zeros(weight.shape[1])
        )
        packed += [_padded(weight), _padded(bias)]
    for layer in (model.interface, model.output):
        packed += [_padded(layer.weight.t()), _padded(layer.bias)]
    return [tensor.detach() for tensor in packed]


def controller_sizes(model: ControllerMemoryModel) -> dict[str, int]:
    """cell.h's sizes: inputs, outputs, hidden width, layers, the output activation."""
    return {
        "IN": model.input_size,
        "OUT": model.output_size,
        "HID": model.controller.hidden_size,
        "LAYERS": model.controller.layers,
        "SIGMOID_OUT": int(model.config.output_activation == "sigmoid"),
    }


class _Built:
    """A pool's step for one model, with what it was built from: the model (weakly, so that
    a new model at a freed one's address is not mistaken for it), its parameters' storage
    and versions, and the pool's tensors. `step` is None where the build failed (logged
    once by `kernels.cpu_step`): the PyTorch path steps."""

    def __init__(self, model: ControllerMemoryModel, pool: StatePool) -> None:
        self.model = weakref.ref(model)
        self.params = tuple(model.parameters())
        self.key = self.current(pool)
        self.step: FusedStep | None = None
        if model.device.type != "cpu" or any(s.dtype != torch.float32 for s in pool.specs):
            return
        kind, sizes, names = model.fused_layout()
        state = [None if name is None else pool[name] for name in names]
        try:
            self.step = FusedStep(
                kind, {**controller_sizes(model), **sizes}, packed_parameters(model), state
            )
        except BuildError:
            self.step = None

    def current(self, pool: StatePool) -> list[int]:
        """What the step depends on, as it is now: a change (a training step, `load_state_dict`,
        `.to()`, a pool tensor replaced) means packing again."""
        return [
            *[p._version for p in self.params],
            *[p.data_ptr() for p in self.params],
            *[tensor.data_ptr() for tensor in pool.tensors.values()],
        ]

    def fits(self, model: ControllerMemoryModel, pool: StatePool) -> bool:
        return self.model() is model and self.key == self.current(pool)


_steps: weakref.WeakKeyDictionary[StatePool, dict[int, _Built]] = weakref.WeakKeyDictionary()


def fused_step(model: ControllerMemoryModel, pool: StatePool) -> FusedStep | None:
    """The fused step of `model` over `pool`, or None where it does not apply (a pool not
    on the CPU or not float32, a backend forced otherwise, `MEMSERVE_FUSED_STEP=0`, no C
    compiler, a build that failed)."""
    if not use_fused_cpu_step(pool.device):
        return None
    built = _steps.get(pool, {}).get(id(model))
    if built is None or not built.fits(model, pool):
        built = _Built(model, pool)
        _steps.setdefault(pool, {})[id(model)] = built
    return built.step

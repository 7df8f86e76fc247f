"""The LSTM controller the NTM and the DNC share, and the model skeleton around it.

`LSTMController` is a stack of LSTM cells stepped one at a time; its state for a batch is
`h` and `c`, each `[B, layers, hidden]`, the layout a session's slot keeps in the state pool,
so training and serving pass it around unchanged. `ControllerMemoryModel` is everything of
the NTM and the DNC but their memory: the controller, interface and output layers, the
learned initial reads and controller state, the training forward and the serving step.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn

from models.activations import sigmoid
from models.base import MemoryModel, on_live_rows
from models.fused import fused_step
from models.state import StatePool, StateSpec

OUTPUT_ACTIVATIONS = ("sigmoid", "identity")


ROW_TILE = 8  # rows per product in `rowwise_product`, whatever the batch
MIN_OUTPUTS = 16  # narrower products are padded to this many outputs (`rowwise_product`)


def rowwise_product(inputs: Tensor, weight: Tensor) -> Tensor:
    """`inputs @ weight.T` computed so that each row's result does not depend on the others.

    A plain matrix product picks its blocking, and so its summation order, from the batch
    size: the same session's outputs then differ in the last bits between a launch of 1 and
    a launch of 32, and recurrent memories amplify that over steps. Here the rows are cut
    into tiles of ROW_TILE (the last one padded with zeros) and every tile is the same
    [ROW_TILE, K] @ [K, N] product of one batched call over stride-0 views of the weights,
    so a row's result is the same whichever rows share its launch or tile
    (tests/models/test_controller.py checks this bit for bit). ROW_TILE trades a little at
    one row for much at many (docs/performance.md, "Row-wise products").

    With more than one intra-op thread there are always two tiles at least: a batch of one
    product may be split along its inner dimension across threads (seen at K >= 2000), and a
    batch of several is split by tile. Fewer than MIN_OUTPUTS outputs are padded with zero
    rows of weights: on an AVX2 CPU such narrow products gave a row different bits at
    different places in its tile (docs/performance.md, "Row-wise products").
    """
    rows, width = inputs.shape
    outputs = weight.shape[0]
    if outputs < MIN_OUTPUTS:
        weight = torch.cat([weight, weight.new_zeros(MIN_OUTPUTS - outputs, width)])
    padding = -rows % ROW_TILE
    if rows + padding == ROW_TILE and torch.get_num_threads() > 1:
        padding += ROW_TILE
    if padding:
        inputs = torch.cat([inputs, inputs.new_zeros(padding, width)])
    tiles = inputs.reshape(-1, ROW_TILE, width)
    products = torch.bmm(tiles, weight.t().expand(tiles.shape[0], -1, -1))
    return products.view(-1, weight.shape[0])[:rows, :outputs]


def rowwise_linear(inputs: Tensor, layer: nn.Linear) -> Tensor:
    """`layer(inputs)` with `rowwise_product`."""
    outputs = rowwise_product(inputs, layer.weight)
    return outputs if layer.bias is None else outputs + layer.bias


class LSTMController(nn.Module):
    """`layers` LSTM cells of width `hidden_size`; layer l > 0 reads layer l-1's output."""

    def __init__(self, input_size: int, hidden_size: int, layers: int) -> None:
        super().__init__()
        if layers < 1 or hidden_size < 1:
            raise ValueError(
                f"the controller needs layers >= 1 and hidden size >= 1, got "
                f"{layers} layers of {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.layers = layers
        self.cells = nn.ModuleList(
            nn.LSTMCell(input_size if layer == 0 else hidden_size, hidden_size)
            for layer in range(layers)
        )

    def forward(self, inputs: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One step: inputs `[B, input_size]`, h and c `[B, layers, hidden]` -> new h and c."""
        new_h, new_c = [], []
        layer_input = inputs
        for layer, cell in enumerate(self.cells):
            h_layer, c_layer = cell(layer_input, (h[:, layer], c[:, layer]))
            new_h.append(h_layer)
            new_c.append(c_layer)
            layer_input = h_layer
        return torch.stack(new_h, dim=1), torch.stack(new_c, dim=1)

    def step(self, inputs: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """`forward` for serving: the same LSTM equations, each row independent of the batch
        (`rowwise_linear`, `models.activations`); gate order i, f, g, o as in `nn.LSTMCell`."""
        new_h, new_c = [], []
        layer_input = inputs
        for layer, cell in enumerate(self.cells):
            assert isinstance(cell, nn.LSTMCell)
            gates = rowwise_product(layer_input, cell.weight_ih) + rowwise_product(
                h[:, layer], cell.weight_hh
            )
            if cell.bias_ih is not None:
                gates = gates + cell.bias_ih + cell.bias_hh
            # One sigmoid over all four gates (g's is not used): a third of the operations of
            # three, and the same bits, since each element's are its own (`models.activations`).
            i, f, _, o = sigmoid(gates).chunk(4, dim=1)
            g = gates.chunk(4, dim=1)[2]
            c_layer = f * c[:, layer] + i * torch.tanh(g)
            h_layer = o * torch.tanh(c_layer)
            new_h.append(h_layer)
            new_c.append(c_layer)
            layer_input = h_layer
        return torch.stack(new_h, dim=1), torch.stack(new_c, dim=1)


class ControllerMemoryModel(MemoryModel):
    """An LSTM controller driving an external memory, the shape the NTM and the DNC share.

    Each step the controller reads `[x_t; reads_{t-1}]`, a linear interface layer turns its
    top hidden state into the memory's parameters for this step, the memory updates and
    returns R read vectors, and the output layer maps `[h_t; reads_t]` to the output. The
    reads and the controller's h and c are per-session state (learned initial values); a
    subclass adds its memory's state and says how one memory step runs, functionally for
    training (`memory_forward`) and in place on a pool for serving (`memory_step`).
    """

    initial_reads: nn.Parameter
    initial_h: nn.Parameter
    initial_c: nn.Parameter

    def __init__(
        self,
        input_size: int,
        output_size: int,
        read_heads: int,
        read_width: int,
        controller_size: int,
        controller_layers: int,
        interface_size: int,
        output_activation: str,
    ) -> None:
        super().__init__()
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
            )
        self._sizes = (input_size, output_size)
        self._sigmoid = output_activation == "sigmoid"
        reads = read_heads * read_width
        self.controller = LSTMController(input_size + reads, controller_size, controller_layers)
        self.interface = nn.Linear(controller_size, interface_size)
        self.output = nn.Linear(controller_size + reads, output_size)
        self.initial_reads = nn.Parameter(torch.zeros(read_heads, read_width))
        self.initial_h = nn.Parameter(torch.zeros(controller_layers, controller_size))
        self.initial_c = nn.Parameter(torch.zeros(controller_layers, controller_size))

    @property
    def input_size(self) -> int:
        return self._sizes[0]

    @property
    def output_size(self) -> int:
        return self._sizes[1]

    @abstractmethod
    def memory_specs(self) -> tuple[StateSpec, ...]:
        """The memory's per-session state (the controller's reads, h and c come after it)."""

    @abstractmethod
    def initial_memory_state(self) -> dict[str, Tensor]:
        """The memory state of a new session, one tensor per `memory_specs` entry."""

    @abstractmethod
    def memory_forward(
        self, state: dict[str, Tensor], interface: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One differentiable memory step for a batch: new state and reads `[B, R, width]`."""

    @abstractmethod
    def memory_step(self, pool: StatePool, slots: Tensor, interface: Tensor) -> Tensor:
        """One memory step in place at `slots` (all live, checked); returns reads."""

    @abstractmethod
    def fused_layout(self) -> tuple[str, dict[str, int], tuple[str | None, ...]]:
        """For the fused CPU step (`models.fused`): the source's kind, its memory sizes, and
        the pool tensors it takes in order (None for one this model has not)."""

    def state_specs(self) -> tuple[StateSpec, ...]:
        reads, h = self.initial_reads, self.initial_h
        return (
            *self.memory_specs(),
            StateSpec("reads", tuple(reads.shape)),
            StateSpec("h", tuple(h.shape)),
            StateSpec("c", tuple(h.shape)),
        )

    def initial_state(self) -> dict[str, Tensor]:
        learned = {"reads": self.initial_reads, "h": self.initial_h, "c": self.initial_c}
        state = {**self.initial_memory_state(), **learned}
        return {name: tensor.detach().clone() for name, tensor in state.items()}

    def _activate(self, logits: Tensor) -> Tensor:
        return sigmoid(logits) if self._sigmoid else logits

    def _read_out(self, h: Tensor, reads: Tensor, rowwise: bool = False) -> Tensor:
        features = torch.cat([h[:, -1], reads.flatten(1)], dim=1)
        outputs: Tensor = (
            rowwise_linear(features, self.output) if rowwise else self.output(features)
        )
        return outputs

    def forward(self, inputs: Tensor, activate: bool = True) -> Tensor:
        """Outputs `[B, T, output_size]` for inputs `[B, T, input_size]` from the initial state.

        `activate=False` returns the outputs before the output activation (logits), which
        is what a numerically stable loss wants.
        """
        batch = inputs.shape[0]
        memory = {
            name: tensor.expand(batch, *tensor.shape)
            for name, tensor in self.initial_memory_state().items()
        }
        reads = self.initial_reads.expand(batch, -1, -1)
        h = self.initial_h.expand(batch, -1, -1)
        c = self.initial_c.expand(batch, -1, -1)
        outputs = []
        for t in range(inputs.shape[1]):
            h, c = self.controller(torch.cat([inputs[:, t], reads.flatten(1)], dim=1), h, c)
            memory, reads = self.memory_forward(memory, self.interface(h[:, -1]))
            outputs.append(self._read_out(h, reads))
        logits = torch.stack(outputs, dim=1)
        return self._activate(logits) if activate else logits

    @torch.no_grad()
    def step(self, pool: StatePool, slots: Tensor, inputs: Tensor, check: bool = True) -> Tensor:
        if not check:
            return self._step_live(pool, slots, inputs)
        self.check_step_inputs(pool, slots, inputs)
        fused = fused_step(self, pool)
        if fused is not None:  # padding rows as they are: the C step skips them
            return fused(slots, inputs)
        return on_live_rows(
            slots, (inputs,), self.output_size, lambda live, x: self._step_live(pool, live, x)
        )

    def _step_live(self, pool: StatePool, slots: Tensor, inputs: Tensor) -> Tensor:
        """One step of the sessions in `slots`, every one live. Row-wise products and
        activations: a session's outputs do not depend on who shares its launch. On a CPU,
        one call of the fused step (`models.fused`) where it applies."""
        fused = fused_step(self, pool)
        if fused is not None:
            return fused(slots, inputs)
        controller_inputs = torch.cat([inputs.float(), pool["reads"][slots].flatten(1)], 1)
        h, c = self.controller.step(controller_inputs, pool["h"][slots], pool["c"][slots])
        reads = self.memory_step(pool, slots, rowwise_linear(h[:, -1], self.interface))
        pool["reads"][slots] = reads
        pool["h"][slots] = h
        pool["c"][slots] = c
        return self._activate(self._read_out(h, reads, rowwise=True))

"""The LSTM controller the NTM and the DNC share: a stack of LSTM cells stepped one at a time.

Its state for a batch is `h` and `c`, each `[B, layers, hidden]`, the same layout a
session's slot keeps in the state pool, so training and serving pass it around unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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

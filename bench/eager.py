"""Plain vectorised eager PyTorch steps of the NTM and the DNC: the yardstick of issue 20.

What someone would write in an afternoon (`nn.LSTMCell`, one `Linear` for the interface,
`einsum`, `softmax`, `torch.roll`, `**`, broadcasting), with a batch's state as `[B, ...]`
tensors instead of a pool, and no validation and no batch invariance. Each takes its weights
from a memserve model, so both compute the same function: bench/step.py times them against
`model.step`, and tests/models/test_fused_step.py uses them as an independent reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.dnc import DNC
from models.ntm import NTM

State = dict[str, Tensor]


def initial_state(model: NTM | DNC, batch: int) -> State:
    """The model's initial state, repeated for `batch` sessions."""
    return {k: v.expand(batch, *v.shape).clone() for k, v in model.initial_state().items()}


def _controller(model: NTM | DNC, state: State, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    cell = model.controller.cells[0]  # one layer, as the bundled models have
    inputs = torch.cat([x, state["reads"].flatten(1)], 1)
    h, c = cell(inputs, (state["h"][:, 0], state["c"][:, 0]))
    return h, c, model.interface(h)


def _finish(model: NTM | DNC, new: State, h: Tensor, c: Tensor, reads: Tensor) -> Tensor:
    new.update(reads=reads, h=h.unsqueeze(1), c=c.unsqueeze(1))
    return torch.sigmoid(model.output(torch.cat([h, reads.flatten(1)], 1)))


def _content(keys: Tensor, memory: Tensor, beta: Tensor) -> Tensor:
    dots = torch.einsum("bhm,bnm->bhn", keys, memory)
    norms = keys.norm(dim=-1)[..., None] * memory.norm(dim=-1)[:, None, :]
    return torch.softmax(beta[..., None] * dots / (norms + 1e-8), dim=-1)


def ntm_step(model: NTM, state: State, x: Tensor) -> tuple[State, Tensor]:
    """One NTM step for a batch: the new state and the outputs."""
    cfg, batch = model.config, x.shape[0]
    M, R, W, K = cfg.memory_width, cfg.read_heads, cfg.write_heads, cfg.shift_radius
    h, c, interface = _controller(model, state, x)
    heads = interface[:, : model.heads * model.head_width].view(batch, model.heads, -1)
    keys, beta, gate, shift, gamma = torch.split(heads, [M, 1, 1, 2 * K + 1, 1], dim=-1)
    erase, add = interface[:, model.heads * model.head_width :].view(batch, W, 2, M).unbind(2)
    memory = state["memory"]
    w = _content(keys, memory, F.softplus(beta[..., 0]))
    g = torch.sigmoid(gate)
    w = g * w + (1 - g) * state["weights"]
    shift = torch.softmax(shift, dim=-1)
    w = torch.stack([torch.roll(w, j - K, dims=-1) for j in range(2 * K + 1)], dim=-1)
    w = (w * shift[..., None, :]).sum(dim=-1)
    w = w ** (1 + F.softplus(gamma))
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-16)
    reads = torch.einsum("brn,bnm->brm", w[:, :R], memory)
    ww = w[:, R:]
    keep = (1 - ww[..., None] * torch.sigmoid(erase)[:, :, None, :]).prod(dim=1)
    memory = memory * keep + torch.einsum("bwn,bwm->bnm", ww, add)
    new = {"memory": memory, "weights": w}
    return new, _finish(model, new, h, c, reads)


def dnc_step(model: DNC, state: State, x: Tensor) -> tuple[State, Tensor]:
    """One DNC step (with temporal links) for a batch: the new state and the outputs."""
    cfg, batch = model.config, x.shape[0]
    R, W = cfg.read_heads, cfg.word_size
    h, c, interface = _controller(model, state, x)
    parts = torch.split(interface, model.split_sizes, dim=-1)
    read_keys, read_beta, write_key, write_beta, erase, vector, free, alloc_g, write_g = parts[:9]
    modes = torch.softmax(parts[9].view(batch, R, 3), dim=-1)
    memory, read_w, write_w = state["memory"], state["read_weights"], state["write_weights"]
    psi = (1 - torch.sigmoid(free)[..., None] * read_w).prod(dim=1)
    usage = (state["usage"] + write_w - state["usage"] * write_w) * psi
    ordered, phi = torch.sort(usage, dim=-1, stable=True)
    exclusive = torch.cumprod(F.pad(ordered[:, :-1], (1, 0), value=1.0), dim=-1)
    allocation = torch.zeros_like(usage).scatter(-1, phi, (1 - ordered) * exclusive)
    content = _content(write_key[:, None], memory, 1 + F.softplus(write_beta))[:, 0]
    ga, gw = torch.sigmoid(alloc_g), torch.sigmoid(write_g)
    write_w = gw * (ga * allocation + (1 - ga) * content)
    memory = memory * (1 - write_w[..., None] * torch.sigmoid(erase)[:, None]) + (
        write_w[..., None] * vector[:, None]
    )
    link = (1 - write_w[..., None] - write_w[:, None]) * state["link"]
    link = (link + write_w[..., None] * state["precedence"][:, None]) * (
        1 - torch.eye(cfg.memory_rows, device=memory.device)
    )
    precedence = (1 - write_w.sum(-1, keepdim=True)) * state["precedence"] + write_w
    content_r = _content(read_keys.view(batch, R, W), memory, 1 + F.softplus(read_beta))
    forward = torch.einsum("brj,bnj->brn", read_w, link)
    backward = torch.einsum("brj,bjn->brn", read_w, link)
    read_w = modes[..., 0:1] * backward + modes[..., 1:2] * content_r + modes[..., 2:3] * forward
    reads = torch.einsum("brn,bnw->brw", read_w, memory)
    new = {"memory": memory, "usage": usage, "precedence": precedence, "link": link}
    new.update(write_weights=write_w, read_weights=read_w)
    return new, _finish(model, new, h, c, reads)

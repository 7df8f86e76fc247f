"""A launch's arrays between host and device: in, in one transfer (`Staging`), and out, in
one copy back (`to_host`). These are the only places a launch of the model's process
(`serving.worker`) waits on, or hands work to, the copy engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ALIGN = 64  # bytes: every staged array starts on a cache line


class Staging:
    """A launch's host arrays on the device, in one transfer.

    On the CPU (`packed=False`, the default there) an array is used where it is. Elsewhere
    the arrays are packed into one host buffer, pinned on CUDA, and copied with one
    asynchronous copy into one device buffer, whose views are returned: the host does not
    wait for the device, and a pageable copy (which would) never happens. The host buffer is
    written again only once the previous transfer out of it is done (a CUDA event; by then
    the previous launch's outputs have come back, so it never waits in practice). Both
    buffers grow to the largest launch seen and stay."""

    def __init__(self, device: torch.device, packed: bool | None = None) -> None:
        self.device = device
        self.packed = device.type != "cpu" if packed is None else packed
        self.host: torch.Tensor | None = None  # uint8, pinned on CUDA
        self.host_bytes: np.ndarray | None = None  # its numpy view, made once
        self.buffer: torch.Tensor | None = None  # uint8 on the device
        self.copied: Any = None  # the CUDA event after the last transfer

    def stage(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if not self.packed:
            return [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += -(-array.nbytes // ALIGN) * ALIGN
        self._reserve(total)
        assert self.host_bytes is not None and self.buffer is not None and self.host is not None
        if self.copied is not None:
            self.copied.synchronize()  # done long ago: the last launch's outputs came back
        for array, offset in zip(arrays, offsets, strict=True):
            view = self.host_bytes[offset : offset + array.nbytes]
            view.view(array.dtype).reshape(array.shape)[...] = array
        if total:
            self.buffer[:total].copy_(self.host[:total], non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.copied.record()
        staged = []
        for array, offset in zip(arrays, offsets, strict=True):
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            raw = self.buffer[offset : offset + array.nbytes]
            staged.append(raw.view(dtype).view(array.shape))
        return staged

    def _reserve(self, size: int) -> None:
        if self.buffer is not None and self.buffer.numel() >= size:
            return
        capacity = max(1 << max(size - 1, 0).bit_length(), 4096)
        if self.copied is not None:
            self.copied.synchronize()  # the old host buffer may still be read from
        pin = self.device.type == "cuda"
        self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self.host_bytes = self.host.numpy()
        self.buffer = torch.empty(capacity, dtype=torch.uint8, device=self.device)


_staging: dict[torch.device, Staging] = {}


def staging_for(device: torch.device) -> Staging:
    """The process's staging buffers for `device`."""
    if device not in _staging:
        _staging[device] = Staging(device)
    return _staging[device]


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The one copy back of a launch: every tensor it returns, in host memory. On a GPU each
    is copied asynchronously into pinned memory and the host waits once for them all."""
    if not tensors or tensors[0].device.type == "cpu":
        return [tensor.detach().contiguous().numpy() for tensor in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors, strict=True):
        host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]

"""A request's tensors, decoded with the checks the server needs (`protos/tensors.py` is the
codec itself): every error is INVALID_ARGUMENT naming the field, so a bad request is
refused before it reaches a session.
"""

from __future__ import annotations

import numpy as np

from protos import memserve_pb2, tensors
from protos.tensors import encode
from serving.errors import InvalidArgument

__all__ = ["decode", "decode_steps", "encode"]


def decode(tensor: memserve_pb2.Tensor, field: str) -> np.ndarray:
    """The array a wire tensor holds (read-only view of its bytes); InvalidArgument otherwise."""
    try:
        return tensors.decode(tensor, field)
    except ValueError as error:
        raise InvalidArgument(str(error)) from error


def decode_steps(tensor: memserve_pb2.Tensor, field: str, width: int, max_steps: int) -> np.ndarray:
    """Step inputs `[T, width]` as native float32, 1 <= T <= max_steps, finite."""
    if tensor.dtype != "float32":
        raise InvalidArgument(f"{field}.dtype must be 'float32', got {tensor.dtype!r}")
    if len(tensor.shape) != 2:
        raise InvalidArgument(
            f"{field}.shape must be [T, {width}] (T steps of this model's input), "
            f"got {list(tensor.shape)}"
        )
    array = decode(tensor, field)
    if array.shape[1] != width:
        raise InvalidArgument(
            f"{field}.shape must be [T, {width}] (T steps of this model's input), "
            f"got {list(array.shape)}"
        )
    if not 1 <= array.shape[0] <= max_steps:
        raise InvalidArgument(
            f"{field}.shape[0] is the number of steps T and must be between 1 and "
            f"{max_steps}, got {array.shape[0]}"
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InvalidArgument(f"{field} holds NaN or Inf")
    return array

"""A request's tensors, decoded with the checks the server needs (`protos/tensors.py` is the
codec itself): every error is INVALID_ARGUMENT naming the field, so a bad request is
refused before it reaches a session.
"""

from __future__ import annotations

import numpy as np

from protos import memserve_pb2, tensors
from protos.tensors import encode, encode_into
from serving.errors import InvalidArgument

__all__ = ["decode", "decode_steps", "encode", "encode_into"]


def decode(tensor: memserve_pb2.Tensor, field: str) -> np.ndarray:
    """The array a wire tensor holds (read-only view of its bytes); InvalidArgument otherwise."""
    try:
        return tensors.decode(tensor, field)
    except ValueError as error:
        raise InvalidArgument(str(error)) from error


FLOAT32 = tensors.DTYPES["float32"]


def decode_steps(tensor: memserve_pb2.Tensor, field: str, width: int, max_steps: int) -> np.ndarray:
    """The T steps of a Step's inputs, `[T, width]` float32, T in 1..max_steps, all finite.

    Every Step call comes through here, so this checks the proto's fields directly rather
    than through the general `decode`; the array is a read-only view of the request's
    bytes."""
    if tensor.dtype != "float32":
        raise InvalidArgument(f"{field}.dtype must be 'float32', got {tensor.dtype!r}")
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != width:
        raise InvalidArgument(
            f"{field}.shape must be [T, {width}] (T steps of this model's input), got {list(shape)}"
        )
    steps = shape[0]
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(
            f"{field}.shape[0] is the number of steps T and must be between 1 and "
            f"{max_steps}, got {steps}"
        )
    data = tensor.data
    if len(data) != steps * width * FLOAT32.itemsize:
        raise InvalidArgument(
            f"{field}.data has {len(data)} bytes; shape {list(shape)} of float32 needs "
            f"{steps * width * FLOAT32.itemsize}"
        )
    array = np.frombuffer(data, FLOAT32).reshape(steps, width)
    if not np.isfinite(array).all():
        raise InvalidArgument(f"{field} holds NaN or Inf")
    return array

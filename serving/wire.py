"""Tensors on the wire: `memserve.v1.Tensor` (dtype, shape, little-endian bytes) <-> numpy.

Decoding checks everything a client can get wrong and names the field in the error, so a
bad request is refused before it reaches a session.
"""

from __future__ import annotations

import numpy as np

from protos import memserve_pb2
from serving.errors import InvalidArgument

MAX_DIMENSIONS = 32  # numpy's limit is 64; no memserve tensor has more than 3

# The dtypes the wire format names, as little-endian numpy dtypes.
DTYPES: dict[str, np.dtype[np.generic]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}


def encode(array: np.ndarray) -> memserve_pb2.Tensor:
    """A wire tensor holding `array` (any of the wire dtypes; sent little-endian)."""
    name = next((n for n, d in DTYPES.items() if d == array.dtype.newbyteorder("<")), None)
    if name is None:
        raise ValueError(f"no wire dtype for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    return memserve_pb2.Tensor(dtype=name, shape=list(array.shape), data=data)


def decode(tensor: memserve_pb2.Tensor, field: str) -> np.ndarray:
    """The array a wire tensor holds (read-only view of its bytes); InvalidArgument otherwise."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"{field}.dtype {tensor.dtype!r} is not a wire dtype (one of {', '.join(DTYPES)})"
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidArgument(
            f"{field}.shape has {len(shape)} dimensions (at most {MAX_DIMENSIONS})"
        )
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"{field}.shape {list(shape)} has a negative size")
    count = 1
    for size in shape:
        count *= size
    if len(tensor.data) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{field}.data has {len(tensor.data)} bytes; shape {list(shape)} of "
            f"{tensor.dtype} needs {count * dtype.itemsize}"
        )
    try:
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as error:  # e.g. a zero-size shape whose other sizes overflow numpy
        raise InvalidArgument(
            f"{field}.shape {list(shape)} is not a valid shape: {error}"
        ) from error


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
    if array.ndim != 2 or array.shape[1] != width:
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

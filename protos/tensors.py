"""Tensors on the wire: `memserve.v1.Tensor` (dtype, shape, little-endian bytes) <-> numpy.

The one codec of the public API, shared by the server (`serving/wire.py` adds the checks of
a step's inputs) and the clients. `decode` checks everything a sender can get wrong and
names the field in its `ValueError`.
"""

from __future__ import annotations

import numpy as np

from protos import memserve_pb2

MAX_DIMENSIONS = 32  # numpy's limit is 64; no memserve tensor has more than 3

# The dtypes the wire format names, as little-endian numpy dtypes.
DTYPES: dict[str, np.dtype[np.generic]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def encode(array: np.ndarray) -> memserve_pb2.Tensor:
    """A wire tensor holding `array` (any of the wire dtypes; sent little-endian)."""
    tensor = memserve_pb2.Tensor()
    encode_into(tensor, array)
    return tensor


def encode_into(tensor: memserve_pb2.Tensor, array: np.ndarray) -> None:
    """`encode` into a message's empty Tensor field, which saves copying a new Tensor into
    it: `encode_into(response.outputs, outputs)`."""
    name = _NAMES.get(array.dtype)
    if name is None:  # a big-endian array, or no wire dtype at all
        name = next((n for n, d in DTYPES.items() if d == array.dtype.newbyteorder("<")), None)
        if name is None:
            raise ValueError(f"no wire dtype for {array.dtype} (one of {', '.join(DTYPES)})")
    tensor.dtype = name
    tensor.shape.extend(array.shape)
    tensor.data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()


def decode(tensor: memserve_pb2.Tensor, field: str) -> np.ndarray:
    """The array a wire tensor holds (a read-only view of its bytes); ValueError otherwise."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(
            f"{field}.dtype {tensor.dtype!r} is not a wire dtype (one of {', '.join(DTYPES)})"
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise ValueError(f"{field}.shape has {len(shape)} dimensions (at most {MAX_DIMENSIONS})")
    if any(size < 0 for size in shape):
        raise ValueError(f"{field}.shape {list(shape)} has a negative size")
    count = 1
    for size in shape:
        count *= size
    if len(tensor.data) != count * dtype.itemsize:
        raise ValueError(
            f"{field}.data has {len(tensor.data)} bytes; shape {list(shape)} of "
            f"{tensor.dtype} needs {count * dtype.itemsize}"
        )
    try:
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as error:  # e.g. a zero-size shape whose other sizes overflow numpy
        raise ValueError(f"{field}.shape {list(shape)} is not a valid shape: {error}") from error

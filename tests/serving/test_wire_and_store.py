"""The wire codec and the parking store on their own: what a client can send, and what
a failing disk leaves behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protos import memserve_pb2
from serving import wire
from serving.errors import InvalidArgument, ResourceExhausted
from serving.store import DirectoryStore, ParkingStore, nbytes


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", "<i4", "<i8", ">f4", ">i8"])
def test_round_trip_is_little_endian(dtype: str) -> None:
    array = (np.arange(12).reshape(3, 4) - 5).astype(dtype)
    message = wire.encode(array)
    assert message.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = wire.decode(message, "x")
    np.testing.assert_array_equal(decoded, array)
    assert list(message.shape) == [3, 4]


@pytest.mark.parametrize(
    ("shape", "data", "words"),
    [
        ([1] * 65, b"\0" * 4, "dimensions"),
        ([0, 2**62, 2**62], b"", "not a valid shape"),
        ([2**40, 2**40], b"", "bytes"),
        ([-1], b"", "negative"),
    ],
)
def test_hostile_shapes_are_invalid_arguments(shape: list[int], data: bytes, words: str) -> None:
    message = memserve_pb2.Tensor(dtype="float32", shape=shape, data=data)
    with pytest.raises(InvalidArgument, match=words):
        wire.decode(message, "x")


def test_step_inputs_must_be_float32_rows_of_the_model() -> None:
    good = wire.encode(np.ones((3, 9), np.float32))
    assert wire.decode_steps(good, "inputs", 9, 8).shape == (3, 9)
    with pytest.raises(InvalidArgument, match=r"between 1 and 2"):
        wire.decode_steps(good, "inputs", 9, 2)
    with pytest.raises(InvalidArgument, match=r"\[T, 9\]"):
        wire.decode_steps(wire.encode(np.ones((3, 9, 1), np.float32)), "inputs", 9, 8)


def state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "memory": torch.rand(8, 4, generator=generator),
        "h": torch.rand(3, generator=generator),
    }


def test_host_budget_overflows_to_disk_least_recently_parked_first(tmp_path: Path) -> None:
    size = nbytes(state(0))
    store = ParkingStore(2 * size, DirectoryStore(tmp_path))
    for key in "abc":
        store.park(key, state(ord(key)))
    assert store.residence("a") == "parked_disk"  # the oldest went to disk
    assert store.residence("b") == store.residence("c") == "parked_host"
    assert store.host.bytes == 2 * size
    for key in "abc":
        restored, _ = store.unpark(key)
        for name, tensor in state(ord(key)).items():
            assert torch.equal(restored[name], tensor)
    assert store.host.bytes == 0 and not list(tmp_path.iterdir())


def test_failing_disk_leaves_nothing_counted(tmp_path: Path) -> None:
    directory = tmp_path / "parked"
    size = nbytes(state(0))
    store = ParkingStore(size + size // 2, DirectoryStore(directory))
    store.park("a", state(1))
    directory.rmdir()
    directory.write_text("no longer a directory")
    with pytest.raises(ResourceExhausted, match="cannot park"):
        store.park("b", state(2))  # demoting "a" fails
    assert store.host.bytes == size and "b" not in store.host and "a" in store.host

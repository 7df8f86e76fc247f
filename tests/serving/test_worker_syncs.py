"""The worker's launch path makes the host wait for the device once: its copy back.

On a GPU an operation whose answer the host needs at once (`item`, `tolist`, `bool(t)`, a
copy to host memory, `nonzero` and the other operations whose output size depends on the
data, indexing with a mask or a host list, a host tensor copied in without `non_blocking`)
stalls the launch until every kernel queued before it has run. Here, without a GPU, every
launch runs under a `TorchFunctionMode` that fails on each of those, except inside the
launch's one copy back (`serving.staging.to_host`, called once per launch) and its one
transfer in (`serving.staging.Staging.stage`), and inside Triton's interpreter, which stands
in for a GPU's asynchronous kernel launch. The models run as on a GPU: the Triton kernels
(interpreted) with the PyTorch controller; and as on a CPU, the fused C step.

What is not verified here: that the pinned buffers and `non_blocking` copies overlap on a
real device (`Staging` is checked for its packing on the CPU below), and CUDA graphs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernels.backend import BACKEND_ENV, FUSED_ENV
from models import checkpoint
from models.base import MemoryModel
from models.state import StatePool
from serving import worker
from serving.protocol import (
    BeginBatch,
    BeginRow,
    DecodeBatch,
    DecodeRow,
    EncodeBatch,
    Landed,
    Launch,
    Operation,
    StepBatch,
)
from serving.staging import ALIGN, Staging
from serving.worker import host_state, run_launch

Tensor = torch.Tensor

# Answers the host cannot have without waiting for the device.
SYNCS: set[Callable[..., Any]] = {
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__bool__, Tensor.__int__,
    Tensor.__float__, Tensor.__index__, Tensor.__complex__, Tensor.__array__,
    Tensor.__repr__, Tensor.__format__, Tensor.is_nonzero, Tensor.nonzero, Tensor.argwhere,
    Tensor.masked_select, Tensor.unique, Tensor.unique_consecutive, Tensor.bincount,
    torch.nonzero, torch.argwhere, torch.masked_select, torch.unique,
    torch.unique_consecutive, torch.bincount, torch.equal, torch.allclose,
}  # fmt: skip
TRITON = Path(sys.modules["triton"].__file__ or "").parent if "triton" in sys.modules else None


def sync_reason(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why calling `func` this way would wait for a GPU, or "" if it would not."""
    name = getattr(func, "__qualname__", repr(func))
    if func in SYNCS:
        return name
    if func in (torch.where,) and len(args) + len(kwargs) == 1:
        return "torch.where(condition)"
    if func in (torch.repeat_interleave, Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, Tensor) and kwargs.get("output_size") is None:
            return f"{name} without output_size"
    if func in (Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put):
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple | list) else (index,)
        if isinstance(index, list | np.ndarray) or any(
            isinstance(part, np.ndarray | list)
            or (isinstance(part, Tensor) and part.dtype == torch.bool)
            for part in parts
        ):
            return f"{name} with a mask or a host index"
    if func in (Tensor.to, Tensor.cuda, Tensor.copy_) and not kwargs.get("non_blocking"):
        moves = func is Tensor.cuda or any(
            isinstance(a, str | torch.device) for a in [*args[1:], kwargs.get("device")]
        )  # a copy_ from the host: only Staging makes them, asynchronously
        if moves:
            return f"{name} to a device without non_blocking"
    if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
        return f"{name} from host data onto a device"
    return ""


class NoHostSync(TorchFunctionMode):
    """Fails on every operation that `sync_reason` names, outside `allowed` code and
    Triton's interpreter; counts the calls of `to_host` it lets through."""

    def __init__(self, allowed: set[CodeType]) -> None:
        super().__init__()
        self.allowed = allowed
        self.seen: list[str] = []

    def permitted(self) -> bool:
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self.allowed:
                return True
            if TRITON is not None and frame.f_code.co_filename.startswith(str(TRITON)):
                return True
            frame = frame.f_back
        return False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason and not self.permitted():
            raise AssertionError(f"{reason} would wait for the device")
        return func(*args, **kwargs)


class Watched:
    """Runs a call under NoHostSync and says how many times it copied back to the host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.copies = 0
        original = worker.to_host

        def counted(tensors: Any) -> list[np.ndarray]:
            self.copies += 1
            return original(tensors)

        monkeypatch.setattr(worker, "to_host", counted)
        self.allowed = {original.__code__, Staging.stage.__code__, Staging._reserve.__code__}

    def __call__(self, function: Callable[..., Any], *args: Any) -> tuple[Any, int]:
        self.copies = 0
        with NoHostSync(self.allowed):
            result = function(*args)
        return result, self.copies


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Watched:
    return Watched(monkeypatch)


def test_the_mode_catches_what_would_wait(watched: Watched) -> None:
    """Each kind of wait is seen, so a launch that passes has none of them."""
    t = torch.rand(4)
    cases: list[Callable[[], object]] = [
        lambda: t.sum().item(), lambda: bool(t[0] > 0), lambda: t.tolist(), lambda: t.cpu(),
        lambda: t.numpy(), lambda: torch.nonzero(t), lambda: t[t > 0.5], lambda: t[[0, 1]],
        lambda: int(t.argmax()), lambda: t.to("cpu"), lambda: torch.equal(t, t),
        lambda: torch.tensor([1], device="cpu"), lambda: torch.where(t > 0),
    ]  # fmt: skip
    for case in cases:
        with pytest.raises(AssertionError, match="would wait"):
            watched(case)

    def fine() -> None:
        t[torch.tensor([0, 1])] = 0.0  # an index on the device
        t.to(torch.float64)
        t.to("cpu", non_blocking=True)
        worker.to_host([t[1:3].clone()])  # the copy back

    assert watched(fine) == (None, 1)


def stepped(model: MemoryModel, capacity: int) -> Any:
    pool = model.new_pool(capacity)
    model.reset(pool, range(capacity))
    return pool


def launched_once(
    watched: Watched, model: MemoryModel, pools: list[StatePool], launch: Launch
) -> tuple[Landed, Landed]:
    """`launch` on the first pool under the mode (one copy back, asserted) and on the
    second without it; both pools end alike. The two launches' results."""
    landed, copies = watched(run_launch, model, pools[0], launch)
    assert copies == 1
    expected = run_launch(model, pools[1], launch)
    for name in pools[0]:
        assert torch.equal(pools[0][name], pools[1][name]), name
    return landed, expected


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(("triton", "1"), id="triton kernels, as on a GPU"),
        pytest.param(("torch", "1"), id="the fused CPU step"),
    ],
)
@pytest.mark.parametrize("name", ["ntm-copy", "dnc-recall"])
def test_a_step_launch_waits_once(
    name: str,
    backend: tuple[str, str],
    watched: Watched,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Save, park, restore, then rows of 3, 2 and 1 steps: one copy back, the same outputs
    and states as without the mode."""
    monkeypatch.setenv(BACKEND_ENV, backend[0])
    monkeypatch.setenv(FUSED_ENV, backend[1])
    model = checkpoint.load(name)
    pools = [stepped(model, 5) for _ in range(2)]
    elsewhere = host_state(stepped(model, 1).read(0))
    rng = np.random.default_rng(3)
    rows = [rng.random((steps, model.input_size), dtype=np.float32) for steps in (3, 2, 1)]
    launch = Launch(
        batches=(StepBatch.of(np.array([4, 1, 2], np.int64), rows),),
        park=(1,),
        restore=((1, elsewhere),),
        save=(2,),
    )
    landed, expected = launched_once(watched, model, pools, launch)
    assert np.array_equal(landed.outputs[Operation.STEP], expected.outputs[Operation.STEP])
    got_states, want_states = [*landed.parked, *landed.saved], [*expected.parked, *expected.saved]
    for got, want in zip(got_states, want_states, strict=True):
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in got)


def test_a_dialogue_launch_waits_once(watched: Watched, monkeypatch: pytest.MonkeyPatch) -> None:
    """vmed-chat's four operations in one launch (Triton kernels, interpreted): one copy
    back, the tokens sampled on the host after it, as without the mode."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    model = checkpoint.load("vmed-chat")
    pools = [stepped(model, 5) for _ in range(2)]
    latent = next(spec.shape[0] for spec in model.state_specs() if spec.name == "z")
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(latent).astype(np.float32)
    decode_rows = [DecodeRow(4, 0.8, 5, 0.9, 0.25), DecodeRow(9, 0.0, 0, 1.0, 0.5)]
    launch = Launch(
        batches=(
            EncodeBatch.of(np.array([0, 1], np.int64), [5, 7]),
            BeginBatch.of(np.array([2], np.int64), [BeginRow(noise, 0.3)]),
            DecodeBatch.of(np.array([3, 4], np.int64), decode_rows),
        ),
        park=(0,),
    )
    landed, expected = launched_once(watched, model, pools, launch)
    tokens = landed.outputs[Operation.DECODE]
    assert tokens.shape == (2,) and np.array_equal(tokens, expected.outputs[Operation.DECODE])


def test_staging_packs_every_array_into_one_transfer() -> None:
    """`Staging` with packing on the CPU (on a GPU the host buffer is pinned and the copy
    asynchronous): each array comes back as it went in, whatever its dtype and shape, at an
    aligned offset of one buffer; a larger launch grows the buffers, a smaller reuses them."""
    staging = Staging(torch.device("cpu"), packed=True)
    rng = np.random.default_rng(1)
    arrays: list[np.ndarray] = [
        rng.permutation(7).astype(np.int64), rng.random((3, 4, 9), dtype=np.float32),
        np.zeros((0, 5), np.float32), rng.random(3), np.array([1.5], np.float32),
    ]  # fmt: skip
    staged = staging.stage(arrays)
    assert staging.buffer is not None
    base = staging.buffer.data_ptr()
    for array, tensor in zip(arrays, staged, strict=True):
        assert tensor.numpy().dtype == array.dtype and np.array_equal(tensor.numpy(), array)
        if array.size:
            assert (tensor.data_ptr() - base) % ALIGN == 0
            assert base <= tensor.data_ptr() < base + staging.buffer.numel()
    small = staging.stage([np.arange(3)])
    assert staging.buffer.data_ptr() == base and np.array_equal(small[0].numpy(), np.arange(3))
    big = rng.random(5000, dtype=np.float32)
    (grown,) = staging.stage([big])
    assert staging.buffer.numel() >= big.nbytes and np.array_equal(grown.numpy(), big)
    plain = Staging(torch.device("cpu"))
    assert not plain.packed and plain.stage([big])[0].data_ptr() == big.ctypes.data


def test_a_bad_restore_is_refused_on_the_host_before_anything_changes() -> None:
    model = checkpoint.load("ntm-copy")
    pool = stepped(model, 3)
    before = {name: pool[name].clone() for name in pool}
    good = host_state(pool.read(0))
    bad = {**good, "memory": np.full_like(good["memory"], np.nan)}
    inputs = np.random.default_rng().random((1, 1, model.input_size), dtype=np.float32)
    launch = Launch(
        batches=(StepBatch(np.array([0]), inputs, np.array([1])),),
        park=(1, 2),
        restore=((1, good), (2, bad)),
    )
    with pytest.raises(ValueError, match="NaN"):
        run_launch(model, pool, launch)
    for name in pool:
        assert torch.equal(pool[name], before[name])

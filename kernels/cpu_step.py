"""The fused CPU serving step: C sources in `kernels/cpu/`, compiled once per model shape.

A served step on a CPU is a few hundred PyTorch operations, each a dispatch and most a pass
over a `[B, N, M]` temporary; the fused step is one C call per launch that walks the batch
in tiles of eight rows and keeps each session's memory in the L1 cache for the whole step
(docs/performance.md, "The fused CPU step"). Its specification is the PyTorch path
(`kernels.reference`, `kernels.dnc_reference`, the LSTM equations); tests compare the two.

The sources are compiled with the machine's C compiler (`$CC`, else `cc`, `gcc`) for this
CPU (`-march=native`), every size a compile-time constant, into a cache folder
(`$MEMSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/memserve`, else `~/.cache/memserve`) under
a name that hashes everything that went into it; a second process finds it there. Where
there is no compiler, `available()` is False and the models keep the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

SOURCES = Path(__file__).parent / "cpu"
KINDS = ("ntm", "dnc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11",
         "-shared", "-fPIC")  # fmt: skip
CACHE_ENV = "MEMSERVE_CACHE_DIR"


def compiler() -> str | None:
    """The C compiler to build with, or None where the machine has none."""
    for name in (os.environ.get("CC", ""), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def available() -> bool:
    """Whether the fused CPU step can be built here."""
    return compiler() is not None


def cache_dir() -> Path:
    if folder := os.environ.get(CACHE_ENV):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memserve"


def _build(kind: str, sizes: tuple[tuple[str, int], ...]) -> Path:
    cc = compiler()
    if cc is None:
        raise RuntimeError("the fused CPU step needs a C compiler (cc or gcc; `make system-deps`)")
    source = SOURCES / f"{kind}.c"
    defines = [f"-D{name}={value}" for name, value in sizes]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (source.read_bytes(), (SOURCES / "cell.h").read_bytes()):
        digest.update(part)
    digest.update("\0".join([version, *FLAGS, *defines]).encode())
    folder = cache_dir()
    library = folder / f"{kind}-{digest.hexdigest()[:24]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / library.name
        done = subprocess.run(
            [cc, *FLAGS, *defines, "-I", str(SOURCES), str(source), "-o", str(built)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr[-4000:]}")
        os.replace(built, library)  # atomic: a concurrent build of the same name is identical
    return library


@functools.cache
def _load(kind: str, sizes: tuple[tuple[str, int], ...]) -> ctypes._NamedFuncPointer:
    function = ctypes.CDLL(str(_build(kind, sizes))).memserve_step
    pointer = ctypes.c_void_p
    function.argtypes = [pointer, pointer, pointer, ctypes.c_int64, pointer, pointer]
    function.restype = ctypes.c_int
    return function


def _addresses(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    for tensor in tensors:
        if tensor is not None and (
            tensor.device.type != "cpu" or tensor.dtype != torch.float32
            or not tensor.is_contiguous()
        ):  # fmt: skip
            raise ValueError("the fused CPU step takes contiguous float32 CPU tensors")
    return (ctypes.c_void_p * len(tensors))(
        *(None if tensor is None else tensor.data_ptr() for tensor in tensors)
    )


class FusedStep:
    """One model shape's compiled step over fixed parameters and pools.

    `params`: per controller layer its packed weight and bias, then the interface layer's
    and the output layer's (`models.fused` packs them); `state`: the pools, in the order
    the kind's source names. The tensors are held, so their addresses stay valid."""

    def __init__(
        self,
        kind: str,
        sizes: Mapping[str, int],
        params: Sequence[Tensor],
        state: Sequence[Tensor | None],
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self._function = _load(kind, tuple(sorted(sizes.items())))
        self._held = (tuple(params), tuple(state))
        self._params = _addresses(params)
        self._state = _addresses(state)
        self.input_size, self.output_size = sizes["IN"], sizes["OUT"]

    def __call__(self, slots: Tensor, inputs: Tensor) -> Tensor:
        """Outputs `[B, output_size]` for slots int64 `[B]` (-1 = padding: zeros, nothing
        read or written) and inputs `[B, input_size]`; the pools are updated in place. The
        caller guarantees that the live slots are unique and inside the pools."""
        slots = slots.contiguous()
        inputs = inputs.to(torch.float32).contiguous()
        batch = slots.shape[0]
        outputs = torch.empty(batch, self.output_size)
        self._function(
            self._params, self._state, slots.data_ptr(), batch, inputs.data_ptr(),
            outputs.data_ptr(),
        )  # fmt: skip
        return outputs

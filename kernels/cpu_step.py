"""The fused CPU serving step: C sources in `kernels/cpu/`, compiled once per model shape.

A served step on a CPU in PyTorch operations is a few hundred of them, each a dispatch and
most a pass over a `[B, N, M]` temporary; the fused step is one C call per launch that
walks the batch in tiles of eight rows and keeps each session's memory in the L1 cache for
its whole memory step (docs/performance.md, "CPU step"). Its specification is the PyTorch
path (`kernels.reference`, `kernels.dnc_reference`, the LSTM equations); the tests compare
the two, and both against bench/eager.py in float64.

Building. The sources are compiled with the machine's C compiler (`$CC`, else `cc`, else
`gcc`) for this CPU (`-march=native`), every size a compile-time constant, into a cache
folder outside the source tree: `$MEMSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/memserve`,
else `~/.cache/memserve`, else (none of them writable, as in a container with a read-only
root) a folder of this user's under the system's temporary directory. A library's name
hashes everything that went into it: both sources, the sizes, the flags, the compiler's
version and what `-march=native` means on this CPU, so a second process (the server's next
start, a replica on the same disk) loads it without compiling, and a different CPU sharing
a home folder compiles its own. A build goes to a temporary name first and is renamed into
place, so concurrent builds of one shape are harmless.

Where it cannot be built (no compiler, a compiler that fails, no writable folder) the
models keep the PyTorch path, and the reason is logged once per process and shape
(logger `memserve.kernels`); `unavailable_reason()` says it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("memserve.kernels")

SOURCES = Path(__file__).parent / "cpu"
KINDS = ("ntm", "dnc")
# -ffp-contract=off: the sources say where a fused multiply-add goes (cell.h: FMA), so the
# bits of a row are what the source says, whatever the compiler vectorises.
# -fno-trapping-math: no floating-point traps, so that branches become selects and the
# loops with them vectorise; it changes no result (only which exception flags get set).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fopenmp-simd", "-std=gnu11", "-shared", "-fPIC")  # fmt: skip
CACHE_ENV = "MEMSERVE_CACHE_DIR"
# A call keeps its scratch on the stack (kernels/cpu/cell.h): a shape that would take more
# than this steps in PyTorch instead (threads other than the main one may have small stacks).
MAX_STACK_BYTES = 1 << 20


class BuildError(RuntimeError):
    """The fused step cannot be built here; the message says why."""


@functools.cache
def compiler() -> str | None:
    """The C compiler to build with, or None where the machine has none. Looked up once
    per process (`compiler.cache_clear()` looks again)."""
    for name in (os.environ.get("CC", ""), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def sources() -> tuple[Path, ...]:
    return (SOURCES / "cell.h", *(SOURCES / f"{kind}.c" for kind in KINDS))


@functools.cache
def unavailable_reason() -> str | None:
    """Why the fused step cannot be built here at all, or None when it can be tried.
    Decided, and a reason logged, once per process (`reset()` decides again)."""
    reason = None
    if compiler() is None:
        reason = "no C compiler (cc or gcc; `make system-deps` installs gcc)"
    elif missing := [path.name for path in sources() if not path.is_file()]:
        reason = f"its sources are not installed: {', '.join(missing)} missing in {SOURCES}"
    if reason is not None:
        log.warning("the fused CPU step is not used, the PyTorch path is: %s", reason)
    return reason


def available() -> bool:
    """Whether the fused CPU step can be tried here (a compiler and the sources)."""
    return unavailable_reason() is None


def reset() -> None:
    """Forget the compiler, the availability and every loaded build's outcome (for tests:
    the next step looks again; libraries already loaded stay mapped)."""
    compiler.cache_clear()
    unavailable_reason.cache_clear()
    _target.cache_clear()
    with _lock:
        _loaded.clear()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_dir() -> Path:
    """Where compiled steps are kept (see the module's docstring). The fallback under the
    temporary directory is made private (0700); one there that another user could write
    to is refused at build time (`_trusted`)."""
    if folder := os.environ.get(CACHE_ENV):
        return Path(folder)  # as told: a build there that fails says so
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    preferred = Path(base) / "memserve"
    if _writable(preferred):
        return preferred
    fallback = Path(tempfile.gettempdir()) / f"memserve-cache-{os.getuid()}"
    with contextlib.suppress(OSError):
        fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


def _trusted(path: Path) -> bool:
    """Whether `path` (a cache folder, a built library) is this user's (or root's), not a
    link, and writable by no one else: a library is loaded into the process, so one that
    another user could have put there is not."""
    try:
        info = path.lstat()
    except OSError:
        return False
    owner_ok = info.st_uid in (os.getuid(), 0)
    return owner_ok and not stat.S_ISLNK(info.st_mode) and not info.st_mode & 0o022


@functools.cache
def _target(cc: str) -> str:
    """What `-march=native` means here: the target and feature flags of the compiler's own
    expansion of it (`-###`: gcc's `-march=... -m...`, clang's `-target-cpu` and
    `-target-feature`), without the rest of that line (it names random temporary files);
    else the CPU's flags."""
    done = subprocess.run(
        [cc, "-march=native", "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull],
        capture_output=True, text=True,
    )  # fmt: skip
    tokens: list[str] = []
    for line in done.stderr.splitlines() if done.returncode == 0 else []:
        with contextlib.suppress(ValueError):
            tokens += shlex.split(line)
    kept = [
        token for index, token in enumerate(tokens)
        if token.startswith(("-march=", "-mtune=", "-m", "+", "--param"))
        or "cache-size" in token or "cache-line" in token
        or (index and tokens[index - 1] in ("-target-cpu", "-target-feature"))
    ]  # fmt: skip
    if any(token.startswith("-march=") for token in kept) or "-target-cpu" in tokens:
        return " ".join(kept)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    return "\n".join([" ".join(kept), *[line for line in cpuinfo if "flags" in line][:1]])


def library_path(kind: str, sizes: Mapping[str, int]) -> Path:
    """Where the build of `kind` at `sizes` is, or will be, cached."""
    cc = compiler()
    if cc is None:
        raise BuildError(unavailable_reason() or "no C compiler")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for path in (SOURCES / "cell.h", SOURCES / f"{kind}.c"):
        digest.update(path.read_bytes())
    defines = [f"-D{name}={value}" for name, value in sorted(sizes.items())]
    digest.update("\0".join([version, _target(cc), *FLAGS, *defines]).encode())
    return cache_dir() / f"{kind}-{digest.hexdigest()[:32]}.so"


def build(kind: str, sizes: Mapping[str, int]) -> Path:
    """The compiled step of `kind` at `sizes`, built now unless the cache has it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (reason := unavailable_reason()) is not None:
        raise BuildError(reason)
    library = library_path(kind, sizes)
    folder = library.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"no writable cache folder ({folder}: {error})") from error
    if not _trusted(folder):
        raise BuildError(f"the cache folder {folder} is not private to this user")
    if library.exists():
        if not _trusted(library):
            raise BuildError(f"{library} is not private to this user: not loaded")
        return library
    try:
        scratch = tempfile.mkdtemp(prefix=".build-", dir=folder)
    except OSError as error:
        raise BuildError(f"no writable cache folder ({folder}: {error})") from error
    try:
        built = Path(scratch) / library.name
        defines = [f"-D{name}={value}" for name, value in sorted(sizes.items())]
        command = [compiler() or "cc", *FLAGS, *defines, "-I", str(SOURCES),
                   str(SOURCES / f"{kind}.c"), "-o", str(built)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"compiling {kind}.c failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, library)  # atomic: a concurrent build of the same name is identical
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return library


class Library:
    """One loaded build: the step and what it checks its arguments against."""

    def __init__(self, path: Path) -> None:
        self.path = path
        handle = ctypes.CDLL(str(path))
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self.step = handle.memserve_step
        self.step.argtypes = [pointer, pointer, pointer, i64, i64, pointer, pointer]
        self.step.restype = ctypes.c_int
        for name in ("memserve_state_floats", "memserve_param_floats"):
            getattr(handle, name).argtypes = [ctypes.c_int]
            getattr(handle, name).restype = i64
        handle.memserve_stack_bytes.restype = i64
        self.stack_bytes = int(handle.memserve_stack_bytes())
        self._handle = handle

    def state_floats(self, index: int) -> int:
        return int(self._handle.memserve_state_floats(index))

    def param_floats(self, index: int) -> int:
        return int(self._handle.memserve_param_floats(index))


_lock = threading.Lock()
_loaded: dict[tuple[str, tuple[tuple[str, int], ...]], Library | BuildError] = {}


def load(kind: str, sizes: Mapping[str, int]) -> Library:
    """The loaded build of `kind` at `sizes`; raises BuildError (the same one every time,
    logged the first time) where it cannot be had."""
    key = (kind, tuple(sorted(sizes.items())))
    with _lock:
        found = _loaded.get(key)
        if found is None:
            try:
                found = Library(build(kind, sizes))
                if found.stack_bytes > MAX_STACK_BYTES:
                    raise BuildError(
                        f"a call would take {found.stack_bytes} bytes of stack "
                        f"(over {MAX_STACK_BYTES})"
                    )
            except (BuildError, OSError, subprocess.SubprocessError) as error:
                found = error if isinstance(error, BuildError) else BuildError(str(error))
                log.warning(
                    "the fused CPU step (%s, %s) is not used, the PyTorch path is: %s",
                    kind, ", ".join(f"{k}={v}" for k, v in key[1]), found,
                )  # fmt: skip
            _loaded[key] = found
    if isinstance(found, BuildError):
        raise found
    return found


def _check(tensor: Tensor, floats: int, what: str) -> None:
    if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
        raise ValueError(f"the fused CPU step takes float32 CPU tensors; {what} is not")
    if not tensor.is_contiguous() or tensor.numel() != floats:
        raise ValueError(f"{what} does not fit this build: {list(tensor.shape)}")


class FusedStep:
    """One model shape's compiled step over fixed parameters and pools.

    `params`: per controller layer its packed weight and bias, then the interface layer's
    and the output layer's (`models.fused` packs them); `state`: the pools, in the order
    the kind's source names (None for one the model has not). Every tensor is checked
    against the build before the first call, and held so that its address stays valid.
    Raises BuildError where the step cannot be built here."""

    def __init__(
        self,
        kind: str,
        sizes: Mapping[str, int],
        params: Sequence[Tensor],
        state: Sequence[Tensor | None],
    ) -> None:
        library = load(kind, sizes)
        for index, param in enumerate(params):
            _check(param, library.param_floats(index), f"parameter {index}")
        if library.param_floats(len(params)) != -1:
            raise ValueError(f"the {kind} step takes more than {len(params)} parameters")
        present = [tensor for tensor in state if tensor is not None]
        self.capacity = present[0].shape[0]
        for index, tensor in enumerate(state):
            if tensor is not None:
                per_slot = library.state_floats(index)
                _check(tensor, self.capacity * per_slot, f"state tensor {index}")
        self._function = library.step
        self._held = (tuple(params), tuple(state))
        self._params = _addresses(params)
        self._state = _addresses(state)
        self.input_size, self.output_size = sizes["IN"], sizes["OUT"]

    def __call__(self, slots: Tensor, inputs: Tensor) -> Tensor:
        """Outputs `[B, output_size]` for slots int64 `[B]` (-1 = padding: zeros, nothing
        read or written) and inputs `[B, input_size]`; the pools are updated in place.
        Raises ValueError, having changed nothing, for a slot outside the pools; the caller
        guarantees that the live slots are unique."""
        batch = slots.shape[0]
        if slots.dtype != torch.int64 or slots.dim() != 1 or slots.device.type != "cpu":
            raise ValueError(f"slots must be a 1-D int64 CPU tensor, got {slots.dtype}")
        if tuple(inputs.shape) != (batch, self.input_size) or inputs.device.type != "cpu":
            raise ValueError(
                f"inputs must be [{batch}, {self.input_size}] on the CPU, "
                f"got {list(inputs.shape)} on {inputs.device}"
            )
        slots = slots.contiguous()
        inputs = inputs.to(torch.float32).contiguous()
        out = torch.empty(batch, self.output_size)
        bad = self._function(
            self._params, self._state, slots.data_ptr(), batch, self.capacity,
            inputs.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        if bad:
            slot = int(slots[bad - 1])
            raise ValueError(f"slots must be -1 (padding) or in [0, {self.capacity}), got {slot}")
        return out


def _addresses(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(
        *(None if tensor is None else tensor.data_ptr() for tensor in tensors)
    )

"""Where a session's state goes when it leaves the pool: host memory, then files.

`StateStore` is the interface (a Redis or a durable directory store later implement the
same four methods). `ParkingStore` tiers two of them: parked states go to host memory, and
while host memory holds more than its budget the least recently parked move to disk.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from serving.errors import ResourceExhausted


def nbytes(state: dict[str, Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


class StateStore(ABC):
    """Session states by key (the session id)."""

    residence: str  # what GetSession reports for a session parked here

    @abstractmethod
    def put(self, key: str, state: dict[str, Tensor]) -> None:
        """Keep `state` under `key` (replacing what was there)."""

    @abstractmethod
    def pop(self, key: str) -> dict[str, Tensor]:
        """Take the state out of the store (KeyError if absent)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Forget `key` if it is there."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...


class HostStore(StateStore):
    """States in host memory, oldest first, with their byte count."""

    residence = "parked_host"

    def __init__(self) -> None:
        self.states: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.bytes = 0

    def put(self, key: str, state: dict[str, Tensor]) -> None:
        self.delete(key)
        self.states[key] = state
        self.bytes += nbytes(state)

    def pop(self, key: str) -> dict[str, Tensor]:
        state = self.states.pop(key)
        self.bytes -= nbytes(state)
        return state

    def oldest(self) -> str:
        return next(iter(self.states))

    def delete(self, key: str) -> None:
        if key in self.states:
            self.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self.states

    def __len__(self) -> int:
        return len(self.states)


class DirectoryStore(StateStore):
    """One safetensors file per state in a directory; each written atomically."""

    residence = "parked_disk"
    SUFFIX = ".safetensors"

    def __init__(self, directory: str | os.PathLike[str], budget: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget  # bytes of states it may hold (None: as many as fit)
        self.sizes: dict[str, int] = {}
        self.bytes = 0

    @property
    def keys(self) -> set[str]:
        return set(self.sizes)

    def path(self, key: str) -> Path:
        return self.directory / (key + self.SUFFIX)

    def put(self, key: str, state: dict[str, Tensor]) -> None:
        size = nbytes(state)
        if self.budget is not None and self.bytes - self.sizes.get(key, 0) + size > self.budget:
            raise ResourceExhausted(
                f"the park directory holds {self.bytes} bytes of parked sessions, the most "
                f"it may (park_disk_bytes = {self.budget})"
            )
        temporary = self.directory / (key + ".tmp")
        try:
            save_file({name: t.contiguous() for name, t in state.items()}, temporary)
            os.replace(temporary, self.path(key))
        except (OSError, SafetensorError) as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise ResourceExhausted(
                f"cannot park a session to {self.directory}: {error}"
            ) from error
        self.bytes += size - self.sizes.get(key, 0)
        self.sizes[key] = size

    def pop(self, key: str) -> dict[str, Tensor]:
        if key not in self.sizes:
            raise KeyError(key)
        path = self.path(key)
        state = load_file(path)
        path.unlink()
        self.bytes -= self.sizes.pop(key)
        return state

    def delete(self, key: str) -> None:
        if key in self.sizes:
            self.bytes -= self.sizes.pop(key)
            self.path(key).unlink(missing_ok=True)

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)


class ParkingStore:
    """Host memory up to `host_budget` bytes, then the directory store (if there is one)."""

    def __init__(self, host_budget: int, disk: DirectoryStore | None) -> None:
        self.host = HostStore()
        self.host_budget = host_budget
        self.disk = disk

    def residence(self, key: str) -> str | None:
        """Which tier holds `key` ("parked_host", "parked_disk"), None if neither."""
        for tier in (self.host, self.disk):
            if tier is not None and key in tier:
                return tier.residence
        return None

    def can_park(self, size: int) -> bool:
        """Whether a state of `size` bytes has somewhere to go (host memory, or the disk
        within its budget after host memory's oldest move there)."""
        if self.host.bytes + size <= self.host_budget:
            return True
        disk = self.disk
        return disk is not None and (disk.budget is None or disk.bytes + size <= disk.budget)

    def park(self, key: str, state: dict[str, Tensor]) -> list[str]:
        """Keep `state`; returns the keys moved from host memory to disk to make room."""
        size = nbytes(state)
        if not self.can_park(size):
            where = (
                "no park directory is configured"
                if self.disk is None
                else f"the park directory is full (park_disk_bytes = {self.disk.budget})"
            )
            raise ResourceExhausted(
                f"the host parking budget (park_host_bytes = {self.host_budget}) is full and "
                f"{where}"
            )
        if self.disk is not None and size > self.host_budget:
            self.disk.put(key, state)
            return []
        self.host.put(key, state)
        demoted = []
        try:
            while self.host.bytes > self.host_budget and self.disk is not None:
                oldest = self.host.oldest()
                self.disk.put(oldest, self.host.states[oldest])
                self.host.pop(oldest)
                demoted.append(oldest)
        except ResourceExhausted:
            self.host.delete(key)  # the caller keeps the state; nothing stays counted here
            raise
        return demoted

    def peek(self, key: str) -> dict[str, Tensor]:
        """A copy of a parked state, left where it is (for forking and exporting)."""
        if key in self.host:
            return {name: t.clone() for name, t in self.host.states[key].items()}
        if self.disk is not None and key in self.disk:
            return load_file(self.disk.path(key))
        raise KeyError(key)

    def unpark(self, key: str) -> tuple[dict[str, Tensor], str]:
        """Take a parked state out; returns it with the tier it came from ("host", "disk")."""
        if key in self.host:
            return self.host.pop(key), "host"
        if self.disk is not None and key in self.disk:
            return self.disk.pop(key), "disk"
        raise KeyError(key)

    def delete(self, key: str) -> None:
        self.host.delete(key)
        if self.disk is not None:
            self.disk.delete(key)

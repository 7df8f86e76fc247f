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

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()

    def path(self, key: str) -> Path:
        return self.directory / (key + self.SUFFIX)

    def put(self, key: str, state: dict[str, Tensor]) -> None:
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
        self.keys.add(key)

    def pop(self, key: str) -> dict[str, Tensor]:
        if key not in self.keys:
            raise KeyError(key)
        path = self.path(key)
        state = load_file(path)
        path.unlink()
        self.keys.discard(key)
        return state

    def delete(self, key: str) -> None:
        if key in self.keys:
            self.keys.discard(key)
            self.path(key).unlink(missing_ok=True)

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)


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
        """Whether a state of `size` bytes has somewhere to go."""
        return self.disk is not None or self.host.bytes + size <= self.host_budget

    def park(self, key: str, state: dict[str, Tensor]) -> list[str]:
        """Keep `state`; returns the keys moved from host memory to disk to make room."""
        size = nbytes(state)
        if not self.can_park(size):
            raise ResourceExhausted(
                f"the host parking budget ({self.host_budget} bytes) is full and no park "
                "directory is configured"
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

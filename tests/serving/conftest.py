"""Fixtures for the serving tests: real servers in child processes, and the same models
stepped alone in this process as the reference they must agree with."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bench.child_server import ServerProcess
from kernels.backend import BACKEND_ENV
from models import checkpoint
from models.base import MemoryModel


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with both bundled models, shared by a test module."""
    log_dir = tmp_path_factory.mktemp("server")
    with ServerProcess(
        log_dir, "--models", "ntm-copy,dnc-recall", "--max-steps-per-call", "64"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def reference_backend() -> Iterator[None]:
    """Step the in-process reference on the PyTorch backend, as the servers do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


class Reference:
    """One session of a model stepped alone in this process: what the server must match."""

    def __init__(self, model: MemoryModel) -> None:
        self.model = model
        self.pool = model.new_pool(1)
        model.reset(self.pool, [0])
        self.steps = 0

    def step(self, inputs: np.ndarray) -> np.ndarray:
        """Outputs `[T, output_size]` for inputs `[T, input_size]`, one step at a time."""
        slots = torch.zeros(1, dtype=torch.int64)
        rows = [
            self.model.step(self.pool, slots, torch.from_numpy(row[None].copy()))[0].numpy()
            for row in inputs
        ]
        self.steps += len(inputs)
        return np.stack(rows)

    def fork(self) -> Reference:
        twin = Reference(self.model)
        twin.pool.write(0, self.pool.read(0))
        twin.steps = self.steps
        return twin


@pytest.fixture(scope="module")
def models(reference_backend: None) -> dict[str, MemoryModel]:
    return {name: checkpoint.load(name) for name in ("ntm-copy", "dnc-recall")}


def random_inputs(rng: np.random.Generator, steps: int, width: int) -> np.ndarray:
    """Bit-like inputs in [0, 1), float32 `[steps, width]`."""
    return rng.random((steps, width), dtype=np.float32)

"""Fixtures of the client tests; the rest of what they share is in servers.py and faces.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from models import checkpoint
from models.base import MemoryModel
from tests.clients.faces import FACES, Face
from tests.clients.fake_server import FakeServer
from tests.clients.servers import torch_backend


@pytest.fixture(scope="module")
def ntm() -> Iterator[MemoryModel]:
    """ntm-copy in process, stepped on the PyTorch backend as the servers step it, on one
    thread: a step is too small to gain from more, and on a busy machine (the servers the
    tests start share it) more threads only wait for each other, many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_backend():
            yield checkpoint.load("ntm-copy")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    """A stand-in server (fake_server.py) for one test."""
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture(params=FACES)
def face(request: pytest.FixtureRequest) -> Face:
    """Each client test that takes this runs once per face of the library."""
    return Face(request.param)

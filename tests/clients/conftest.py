"""Fixtures of the client tests; the rest of what they share is in servers.py and faces.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from models import checkpoint
from models.base import MemoryModel
from tests.clients.faces import FACES, Face
from tests.clients.fake_server import FakeServer
from tests.clients.servers import torch_backend


@pytest.fixture(scope="module")
def ntm() -> Iterator[MemoryModel]:
    """ntm-copy in process, stepped on the PyTorch backend as the servers step it."""
    with torch_backend():
        yield checkpoint.load("ntm-copy")


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

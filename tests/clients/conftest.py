"""Fixtures of the client tests; the rest of what they share is in servers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from models import checkpoint
from models.base import MemoryModel
from tests.clients.servers import torch_backend


@pytest.fixture(scope="module")
def ntm() -> Iterator[MemoryModel]:
    """ntm-copy in process, stepped on the PyTorch backend as the servers step it."""
    with torch_backend():
        yield checkpoint.load("ntm-copy")

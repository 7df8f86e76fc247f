"""What the client tests share: a real server with ntm-copy and the small VMED of
tests/tiny_vmed.py, the in-process reference, and channel options that skip any proxy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernels.backend import BACKEND_ENV
from tests.serving.server_process import ServerProcess
from tests.tiny_vmed import tiny_vmed

TINY = "vmed-tiny"  # the small VMED: replies always run to max_tokens
LIMIT = 120  # --max-new-tokens of the test servers
DIRECT = [("grpc.enable_http_proxy", 0)]  # straight to loopback, whatever http_proxy says


@contextmanager
def served(
    tmp_path_factory: pytest.TempPathFactory, *models: str, args: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    """A server of ntm-copy, the small VMED (as TINY) and `models`."""
    directory, _ = tiny_vmed(tmp_path_factory.mktemp("model") / TINY)
    with ServerProcess(
        tmp_path_factory.mktemp("server"),
        "--models", ",".join(["ntm-copy", str(directory), *models]),
        "--max-new-tokens", str(LIMIT), "--max-steps-per-call", "256", *args,
    ) as process:  # fmt: skip
        yield process


@contextmanager
def torch_backend() -> Iterator[None]:
    """Step in-process references on the PyTorch backend, as the servers do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, "torch")
        yield


def subprocess_env() -> dict[str, str]:
    """The environment of a client subprocess: no proxy for loopback, no interpreter."""
    proxies = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}
    return {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in proxies and name != "TRITON_INTERPRET"
    }


ROOT = Path(__file__).resolve().parents[2]

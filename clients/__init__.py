"""Python client library, chat CLI and load generator; they depend on `protos` only.

    from clients import Client

    with Client("127.0.0.1:50051") as client, client.session("ntm-copy") as session:
        outputs = session.step(inputs)  # numpy [T, input_size] -> numpy [T, output_size]

| module | what |
| --- | --- |
| `client.py` | `Client`, `Session`, `StepStream`, `Generation` (blocking) |
| `aio.py` | `AsyncClient`, `AsyncSession`, `AsyncStepStream`, `AsyncGeneration` |
| `core.py` | what both faces do: deadlines, retries, step bookkeeping, streams, Generate |
| `calls.py` | every unary RPC as a `Call`: its request and how its reply reads |
| `errors.py` | `MemserveError`, the one exception of a failed call |
| `retry.py` | `RetryPolicy`: which calls are repeated, after what, and when; request ids |
| `channel.py` | `TLS`, channel options, the bearer token's metadata |
| `messages.py` | requests, replies as dataclasses, numpy/torch <-> wire tensors, `Sampling` |
| `options.py` | the default target; command-line checks and connection options (no grpc) |
| `chat.py` | `memserve chat` |
| `loadgen/` | `memserve loadgen` |

The names below load on first use, so `memserve --help` (which imports `clients.chat` and
the load generator's parser) does not import grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.aio import AsyncClient, AsyncGeneration, AsyncSession, AsyncStepStream
    from clients.channel import TLS
    from clients.client import Client, Generation, Session, StepStream
    from clients.errors import MemserveError
    from clients.messages import GenerateDone, ModelInfo, SessionInfo, SessionState, Stepped
    from clients.retry import NO_RETRIES, RetryPolicy

_HOMES = {
    "AsyncClient": "clients.aio",
    "AsyncGeneration": "clients.aio",
    "AsyncSession": "clients.aio",
    "AsyncStepStream": "clients.aio",
    "TLS": "clients.channel",
    "Client": "clients.client",
    "Generation": "clients.client",
    "Session": "clients.client",
    "StepStream": "clients.client",
    "MemserveError": "clients.errors",
    "GenerateDone": "clients.messages",
    "ModelInfo": "clients.messages",
    "SessionInfo": "clients.messages",
    "SessionState": "clients.messages",
    "Stepped": "clients.messages",
    "NO_RETRIES": "clients.retry",
    "RetryPolicy": "clients.retry",
}

__all__ = [
    "NO_RETRIES",
    "TLS",
    "AsyncClient",
    "AsyncGeneration",
    "AsyncSession",
    "AsyncStepStream",
    "Client",
    "GenerateDone",
    "Generation",
    "MemserveError",
    "ModelInfo",
    "RetryPolicy",
    "Session",
    "SessionInfo",
    "SessionState",
    "StepStream",
    "Stepped",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

"""The one exception the client library raises for whatever a call to the server ends in.

gRPC's own `grpc.RpcError` never leaves the library: every failed call becomes a
`MemserveError` carrying the status code and the server's message, and how many attempts
the call took (more than one when it was retried, see `clients/retry.py`).
"""

from __future__ import annotations

import grpc


class MemserveError(Exception):
    """A call that did not succeed: `code` (a `grpc.StatusCode`), `message` (the server's
    details, or the client's own explanation), `attempts` (1 unless it was retried)."""

    def __init__(self, code: grpc.StatusCode, message: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, attempts: int = 1) -> MemserveError:
        """The library's error for a failed gRPC call (sync or asyncio)."""
        code_of = getattr(error, "code", None)
        details_of = getattr(error, "details", None)
        code = code_of() if callable(code_of) else None
        details = details_of() if callable(details_of) else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        return cls(code, details or code.name.lower().replace("_", " "), attempts)

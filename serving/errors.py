"""What a request can get wrong, each error carrying the gRPC status code it is answered with.

The layers below the RPC handlers raise these; `service` turns them into a status and a
message. A request that raises one has changed nothing (GUIDE.md: a rejected request
changes no state).
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request the server answers with a non-OK status and this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """Malformed input: a bad dtype, shape, byte length, value or size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """An unknown model, or a session that never existed, expired or was deleted."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    """A step out of order (`expected_step`), or state made for another model."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    """A bound or quota reached: no slot and nothing to park, a full queue, a tenant's
    quota. `retry_after` (seconds) says when waiting helps; it goes to the client as
    `grpc-retry-pushback-ms`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServingError):
    """The server is draining and takes no new work, or a model's process is gone."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(ServingError):
    """The request was cut short by a shutdown; the steps it took stay taken."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(ServingError):
    """A session's stored records are damaged: it cannot be brought back as it was."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ServingError):
    """No API key, or one this server does not know (never saying which keys exist)."""

    code = grpc.StatusCode.UNAUTHENTICATED

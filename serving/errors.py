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
    """No slot and nothing that can be parked to free one."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    """The server is draining and takes no new work, or a model's process is gone."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(ServingError):
    """The request was cut short by a shutdown; the steps it took stay taken."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(ServingError):
    """A session's stored records are damaged: it cannot be brought back as it was."""

    code = grpc.StatusCode.DATA_LOSS

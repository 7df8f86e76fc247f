"""How every request is answered, whatever its RPC: parsed leniently, admitted (not while
the server drains), counted in flight, its `ServingError` turned into its status code and
message, and timed into `memserve_request_duration_seconds{method,code}` (StepStream: every
message). `add_to_server` registers a servicer's methods with the lenient parser.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from serving.errors import InvalidArgument, ServingError, Unavailable
from serving.metrics import Metrics

log = logging.getLogger("memserve.rpc")


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


class Servicer(Protocol):
    admission: Admission


def unary(method: str) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Time a unary handler and answer its `ServingError`s with their status code."""

    def decorate(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @wraps(handler)
        async def wrapped(
            self: Servicer, request: Request, context: grpc.aio.ServicerContext
        ) -> Response:
            async with self.admission.answering(method, request, context):
                return await handler(self, request, context)
            raise AssertionError("unreachable: answering() re-raises or aborts")

        return wrapped

    return decorate


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse (e.g. a string field that is not UTF-8): the handler
    answers INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing request"."""

    type_name: str
    error: str


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Malformed(message_class.DESCRIPTOR.full_name, str(error))

    return parse


def check_parsed(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"request is not a valid {request.type_name}: {request.error}")


def add_to_server(servicer: object, messages: Any, service: str, server: grpc.aio.Server) -> None:
    """Register every method of `service` (in the generated module `messages`) on `server`,
    answered by the servicer's method of that name, with requests parsed by `lenient`."""
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=lenient(getattr(messages, method.input_type.name)),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


class Admission:
    """Which requests are let in, and the count of those being answered."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.draining = False
        self.unavailable: str | None = None  # why new calls are refused for now (the store)
        self.in_flight = 0  # calls (and streams) being handled; the drain waits for them
        self.duration_observers: dict[tuple[str, grpc.StatusCode], Callable[[float], None]] = {}

    def answering(
        self, method: str, request: object, context: grpc.aio.ServicerContext
    ) -> Answering:
        """Around one request (`async with`): see `Answering`."""
        return Answering(self, method, request, context)

    def check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.unavailable is not None:
            raise Unavailable(f"{self.unavailable}; retry later")

    def reject(self, error: ServingError) -> None:
        self.metrics.rejected.labels(error.code.name.lower()).inc()

    def observe_duration(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """memserve_request_duration_seconds{method,code}, each label pair looked up once."""
        observe = self.duration_observers.get((method, code))
        if observe is None:
            observe = self.metrics.request_duration.labels(method, code.name).observe
            self.duration_observers[method, code] = observe
        observe(seconds)


class Answering:
    """Around one request: refuse it while draining or malformed, count it in flight,
    answer `ServingError`s with their status (and unexpected errors with INTERNAL,
    logged), and time it into memserve_request_duration_seconds{method,code}.

    A class rather than `contextlib.asynccontextmanager`, which costs a generator and two
    more coroutines on every call and every stream message."""

    __slots__ = ("admission", "context", "method", "request", "start")

    def __init__(
        self,
        admission: Admission,
        method: str,
        request: object,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.admission = admission
        self.method = method
        self.request = request
        self.context = context
        self.start = 0.0

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        admission = self.admission
        admission.in_flight += 1
        try:
            admission.check_open()
            check_parsed(self.request)
        except ServingError as error:  # __aexit__ does not run when __aenter__ raises
            await self.__aexit__(type(error), error, None)  # aborts the call
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> bool:
        admission = self.admission
        code = grpc.StatusCode.OK
        try:
            if error is None:
                return False
            if isinstance(error, ServingError):
                code = error.code
                admission.reject(error)
                await self.context.abort(code, str(error))
            elif isinstance(error, Exception):  # a bug: say so, as INTERNAL, and log it
                code = grpc.StatusCode.INTERNAL
                log.error(
                    "unexpected error",
                    exc_info=error,
                    extra={"event": "handler_error", "method": self.method},
                )
                await self.context.abort(code, f"internal error: {error}")
            else:  # cancelled: the client went away or the server stops
                code = grpc.StatusCode.CANCELLED
            return False
        finally:
            admission.in_flight -= 1
            admission.observe_duration(self.method, code, time.perf_counter() - self.start)

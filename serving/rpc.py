"""How every request is answered, whatever its RPC: parsed leniently, admitted (not while
the server drains or its store is down; with keys, only a tenant's, within its concurrent
calls), counted in flight, its `ServingError` turned into its status code and message (with
`grpc-retry-pushback-ms` when waiting helps), and timed into
`memserve_request_duration_seconds{method,code}` (StepStream: every message).
`add_to_server` registers a servicer's methods with the lenient parser.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, Protocol, TypeVar

import grpc

from serving.errors import ResourceExhausted, ServingError, Unavailable
from serving.malformed import check_parsed, lenient
from serving.metrics import Metrics
from serving.tenants import OPEN_TENANT, Keys, Tenant, Usage

log = logging.getLogger("memserve.rpc")

# The tenant of the request being answered, for the handlers (set by `Answering`).
current_tenant: contextvars.ContextVar[Tenant] = contextvars.ContextVar(
    "current_tenant", default=OPEN_TENANT
)
CONCURRENCY_PUSHBACK = 0.05  # seconds a caller over its concurrent-call quota should wait


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
    """Which requests are let in: not while draining or while the session store is down;
    with keys (`--auth-keys`), only those of a tenant, and no more of its calls at once than
    its quota. Counts the requests being answered (the drain waits for them)."""

    def __init__(self, metrics: Metrics, keys: Keys | None = None) -> None:
        self.metrics = metrics
        self.keys = keys  # None: an open server, every caller the one tenant ""
        self.draining = False
        self.unavailable: str | None = None  # why new calls are refused for now (the store)
        self.in_flight = 0  # calls (and streams) being handled; the drain waits for them
        self.usage: dict[str, Usage] = {}
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

    def authenticate(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The caller's tenant (UNAUTHENTICATED without a key this server knows)."""
        if self.keys is None:
            return OPEN_TENANT
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
        return self.keys.authenticate(authorization)

    def usage_of(self, tenant: Tenant) -> Usage:
        usage = self.usage.get(tenant.name)
        if usage is None:
            usage = self.usage[tenant.name] = Usage()
        return usage

    def reject(self, error: ServingError, tenant: Tenant | None) -> None:
        reason = error.code.name.lower()
        self.metrics.rejected.labels(reason).inc()
        if tenant is not None and tenant.name:
            self.metrics.tenant_rejected.labels(tenant.name, reason).inc()

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

    __slots__ = ("admission", "context", "method", "request", "start", "tenant", "token")

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
        self.tenant: Tenant | None = None  # once authenticated and counted
        self.token: contextvars.Token[Tenant] | None = None

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        admission = self.admission
        admission.in_flight += 1
        try:
            admission.check_open()
            tenant = admission.authenticate(self.context)
            usage = admission.usage_of(tenant)
            limit = tenant.max_concurrent_calls
            if limit is not None and usage.calls >= limit:
                raise ResourceExhausted(
                    f"tenant {tenant.name!r} has {limit} calls in progress, its "
                    "max_concurrent_calls quota",
                    retry_after=CONCURRENCY_PUSHBACK,
                )
            usage.calls += 1
            self.tenant = tenant
            self.token = current_tenant.set(tenant)
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
                admission.reject(error, self.tenant)
                wait = getattr(error, "retry_after", None)
                if wait is not None:  # gRPC's retry policies honour this
                    pushback = (("grpc-retry-pushback-ms", str(max(1, round(wait * 1000)))),)
                    self.context.set_trailing_metadata(pushback)
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
            if self.tenant is not None:
                admission.usage_of(self.tenant).calls -= 1
                if self.token is not None:
                    current_tenant.reset(self.token)
                if self.tenant.name:
                    admission.metrics.tenant_requests.labels(self.tenant.name, code.name).inc()
            admission.observe_duration(self.method, code, time.perf_counter() - self.start)

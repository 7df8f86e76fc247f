"""The RPC handlers of `memserve.v1.MemServe`: decode and check a request, hand it to the
session's engine, encode the answer. Errors from below arrive as `ServingError`s and leave
as their status code with their message; every call is timed into
`memserve_request_duration_seconds{method,code}` (StepStream: every message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from protos import memserve_pb2, memserve_pb2_grpc
from serving import wire
from serving.engine import ModelEngine
from serving.errors import InvalidArgument, NotFound, ServingError, Unavailable
from serving.export import import_state
from serving.generation import GenerateCall, Sampling
from serving.metrics import Metrics
from serving.sessions import Session, SessionTable

log = logging.getLogger("memserve.service")

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def unary(method: str) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Time a unary handler and answer its `ServingError`s with their status code."""

    def decorate(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @wraps(handler)
        async def wrapped(
            self: MemServeService, request: Request, context: grpc.aio.ServicerContext
        ) -> Response:
            async with self.answering(method, request, context):
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


def add_to_server(service: MemServeService, server: grpc.aio.Server) -> None:
    """Register every MemServe method, with requests parsed by `lenient`."""
    descriptor = memserve_pb2.DESCRIPTOR.services_by_name["MemServe"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[method.client_streaming, method.server_streaming](
            getattr(service, method.name),
            request_deserializer=lenient(getattr(memserve_pb2, method.input_type.name)),
            response_serializer=getattr(memserve_pb2, method.output_type.name).SerializeToString,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


class Answering:
    """Around one request: refuse it while draining or malformed, count it in flight,
    answer `ServingError`s with their status (and unexpected errors with INTERNAL,
    logged), and time it into memserve_request_duration_seconds{method,code}.

    A class rather than `contextlib.asynccontextmanager`, which costs a generator and two
    more coroutines on every call and every stream message."""

    __slots__ = ("context", "method", "request", "service", "start")

    def __init__(
        self,
        service: MemServeService,
        method: str,
        request: object,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.service = service
        self.method = method
        self.request = request
        self.context = context
        self.start = 0.0

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        service = self.service
        service.in_flight += 1
        try:
            service.check_open()
            check_parsed(self.request)
        except ServingError as error:  # __aexit__ does not run when __aenter__ raises
            await self.__aexit__(type(error), error, None)  # aborts the call
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> bool:
        service = self.service
        code = grpc.StatusCode.OK
        try:
            if error is None:
                return False
            if isinstance(error, ServingError):
                code = error.code
                service.reject(error)
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
            service.in_flight -= 1
            service.observe_duration(self.method, code, time.perf_counter() - self.start)


class MemServeService(memserve_pb2_grpc.MemServeServicer):
    """Routes each session's calls to the engine of its model."""

    def __init__(
        self, engines: dict[str, ModelEngine], table: SessionTable, metrics: Metrics
    ) -> None:
        self.engines = engines
        self.table = table
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0  # calls (and streams) being handled; the drain waits for them
        self.duration_observers: dict[tuple[str, grpc.StatusCode], Callable[[float], None]] = {}

    def answering(
        self, method: str, request: object, context: grpc.aio.ServicerContext
    ) -> Answering:
        """Around one request (`async with`): see `Answering`."""
        return Answering(self, method, request, context)

    def observe_duration(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """memserve_request_duration_seconds{method,code}, each label pair looked up once."""
        observe = self.duration_observers.get((method, code))
        if observe is None:
            observe = self.metrics.request_duration.labels(method, code.name).observe
            self.duration_observers[method, code] = observe
        observe(seconds)

    def check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")

    def reject(self, error: ServingError) -> None:
        self.metrics.rejected.labels(error.code.name.lower()).inc()

    def engine(self, model: str) -> ModelEngine:
        engine = self.engines.get(model)
        if engine is None:
            if not model:
                raise InvalidArgument("model is empty")
            raise NotFound(
                f"no model {model!r} on this server (serving: {', '.join(self.engines)})"
            )
        return engine

    def session(self, session_id: str) -> tuple[Session, ModelEngine]:
        session = self.table.get(session_id)
        return session, self.engines[session.model]

    def session_info(self, session: Session, engine: ModelEngine) -> memserve_pb2.SessionInfo:
        return memserve_pb2.SessionInfo(
            session_id=session.id,
            model=session.model,
            step=session.step,
            ttl_seconds=session.ttl,
            residence=engine.slots.residence(session),
        )

    # ------------------------------------------------------------------ RPCs

    @unary("ListModels")
    async def ListModels(
        self, request: memserve_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.ListModelsResponse:
        return memserve_pb2.ListModelsResponse(
            models=[
                memserve_pb2.ModelInfo(
                    name=name,
                    type=engine.card.model_type,
                    input_size=engine.card.input_size,
                    output_size=engine.card.output_size,
                    memory_shape=list(engine.card.memory_shape),
                    state_bytes=engine.card.state_bytes,
                )
                for name, engine in self.engines.items()
            ]
        )

    @unary("CreateSession")
    async def CreateSession(
        self, request: memserve_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        engine = self.engine(request.model)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        seed = request.seed if request.HasField("seed") else None
        session = await engine.lifecycle.create(ttl, seed)
        return self.session_info(session, engine)

    async def _step(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        session, engine = self.session(request.session_id)
        if not request.HasField("inputs"):
            raise InvalidArgument("inputs is missing")
        inputs = wire.decode_steps(
            request.inputs,
            "inputs",
            engine.card.input_size,
            engine.settings.max_steps_per_call,
        )
        expected = request.expected_step if request.HasField("expected_step") else None
        outputs, step = await engine.step(session, inputs, expected)
        response = memserve_pb2.StepResponse(step=step)
        wire.encode_into(response.outputs, outputs)
        return response

    @unary("Step")
    async def Step(
        self, request: memserve_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.StepResponse:
        return await self._step(request)

    async def StepStream(
        self,
        request_iterator: AsyncIterator[memserve_pb2.StepRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[memserve_pb2.StepResponse]:
        """One session's Step calls in order on one stream; the first message names it."""
        bound = ""
        async for request in request_iterator:
            async with self.answering("StepStream", request, context):
                if bound and request.session_id not in ("", bound):
                    raise InvalidArgument(
                        f"session_id {request.session_id!r} differs from the stream's "
                        f"session {bound}; use one stream per session"
                    )
                bound = bound or request.session_id
                request.session_id = bound
                response = await self._step(request)
            yield response

    @unary("GetSession")
    async def GetSession(
        self, request: memserve_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        session, engine = self.session(request.session_id)
        return self.session_info(session, engine)

    @unary("ForkSession")
    async def ForkSession(
        self, request: memserve_pb2.ForkSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        parent, engine = self.session(request.session_id)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        child = await engine.lifecycle.fork(parent, ttl)
        return self.session_info(child, engine)

    @unary("ExportSession")
    async def ExportSession(
        self, request: memserve_pb2.ExportSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionState:
        session, engine = self.session(request.session_id)
        data, step = await engine.lifecycle.export(session)
        return memserve_pb2.SessionState(state=data, model=session.model, step=step)

    @unary("ImportSession")
    async def ImportSession(
        self, request: memserve_pb2.ImportSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        imported = import_state(request.state)
        engine = self.engine(imported.model)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        session = await engine.lifecycle.import_(imported, ttl)
        return self.session_info(session, engine)

    async def Generate(
        self, request: memserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[memserve_pb2.GenerateResponse]:
        """Stream a dialogue model's reply to `text`, piece by piece, then a summary."""
        start = time.perf_counter()
        call: GenerateCall | None = None
        self.metrics.generations_in_flight.inc()
        try:
            async with self.answering("Generate", request, context):
                session, engine = self.session(request.session_id)
                sampling = Sampling.checked(
                    request.max_tokens,
                    engine.settings.max_new_tokens,
                    request.temperature if request.HasField("temperature") else None,
                    request.top_k,
                    request.top_p if request.HasField("top_p") else None,
                    list(request.stop),
                )
                seed = request.seed if request.HasField("seed") else None
                call = engine.generate(session, request.text, sampling, seed)
                last = None
                async for piece in call.stream():
                    now = time.perf_counter()
                    (engine.observe_itl if last else engine.observe_ttft)(now - (last or start))
                    last = now
                    yield memserve_pb2.GenerateResponse(text=piece)
                done = memserve_pb2.GenerateDone(
                    finish_reason=call.finish_reason,
                    prompt_tokens=len(call.prompt),
                    completion_tokens=len(call.generated),
                    text=call.text,
                    step=call.result,
                )
                yield memserve_pb2.GenerateResponse(done=done)
        finally:
            self.metrics.generations_in_flight.dec()
            if call is not None:
                self.metrics.generated_tokens.labels(call.session.model).inc(len(call.generated))
                if call.future is not None and not call.future.done():
                    call.future.cancel()  # the caller left: stop at the next launch

    @unary("DeleteSession")
    async def DeleteSession(
        self, request: memserve_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.DeleteSessionResponse:
        session, engine = self.session(request.session_id)
        await engine.lifecycle.delete(session)
        return memserve_pb2.DeleteSessionResponse()

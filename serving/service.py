"""The RPC handlers of `memserve.v1.MemServe`: decode and check a request, hand it to the
session's engine, encode the answer. How every request is admitted, timed and answered with
a status code is `serving.rpc`'s.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos import journal_pb2, memserve_pb2, memserve_pb2_grpc
from serving import wire
from serving.engine import ModelEngine
from serving.errors import InvalidArgument, NotFound
from serving.export import import_state
from serving.generation import GenerateCall, Sampling
from serving.metrics import Metrics
from serving.replica import Replica
from serving.requests import check_request_id
from serving.rpc import Admission, current_tenant, unary
from serving.sessions import Session, SessionTable
from serving.tenants import Keys


class MemServeService(memserve_pb2_grpc.MemServeServicer):
    """Routes each session's calls to the engine of its model."""

    def __init__(
        self,
        engines: dict[str, ModelEngine],
        table: SessionTable,
        metrics: Metrics,
        keys: Keys | None = None,
    ) -> None:
        self.engines = engines
        self.table = table
        self.metrics = metrics
        self.admission = Admission(metrics, keys)
        self.replica: Replica | None = None  # set when the server is one replica of a cluster

    def engine(self, model: str) -> ModelEngine:
        """The engine of a model the caller's tenant may use (NOT_FOUND as for an unknown
        model otherwise)."""
        tenant = current_tenant.get()
        engine = self.engines.get(model)
        if engine is None or not tenant.may_use(model):
            if not model:
                raise InvalidArgument("model is empty")
            visible = ", ".join(name for name in self.engines if tenant.may_use(name))
            raise NotFound(f"no model {model!r} on this server (serving: {visible})")
        return engine

    async def session(self, session_id: str, read: bool = False) -> tuple[Session, ModelEngine]:
        """A session of the caller's tenant (another's answers as an id never made). A
        cluster replica finds one it does not hold in the shared store, and before a read
        makes sure the copy it holds is the store's (`serving.replica`)."""
        tenant = current_tenant.get().name
        try:
            session = self.table.get(session_id, tenant)
        except NotFound:
            if self.replica is None or not session_id:
                raise
            if await self.replica.find(session_id) is None:
                raise
            session = self.table.get(session_id, tenant)  # found: whose is it?
        engine = self.engines[session.model]
        if read and self.replica is not None:
            session = await self.replica.check(session, engine)
            if session.tenant != tenant:
                self.table.get(session_id, tenant)  # raises as for an id never made
        return session, engine

    def charge(self, steps: int) -> None:
        """Spend `steps` of the caller's tenant's step rate (RESOURCE_EXHAUSTED if over)."""
        tenant = current_tenant.get()
        self.admission.usage_of(tenant).take_steps(tenant, steps)

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
                if current_tenant.get().may_use(name)
            ]
        )

    @unary("CreateSession")
    async def CreateSession(
        self, request: memserve_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        engine = self.engine(request.model)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        seed = request.seed if request.HasField("seed") else None
        tenant = current_tenant.get()
        session = await engine.lifecycle.create(ttl, seed, tenant, *request_key(request))
        return self.session_info(session, engine)

    async def _step(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        session, engine = await self.session(request.session_id)
        if not request.HasField("inputs"):
            raise InvalidArgument("inputs is missing")
        inputs = wire.decode_steps(
            request.inputs,
            "inputs",
            engine.card.input_size,
            engine.settings.max_steps_per_call,
        )
        expected = request.expected_step if request.HasField("expected_step") else None
        self.charge(len(inputs))
        outputs, step = await engine.step(session, inputs, expected, *request_key(request))
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
            async with self.admission.answering("StepStream", request, context):
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
        session, engine = await self.session(request.session_id, read=True)
        return self.session_info(session, engine)

    @unary("ForkSession")
    async def ForkSession(
        self, request: memserve_pb2.ForkSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        parent, engine = await self.session(request.session_id, read=True)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        child = await engine.lifecycle.fork(
            parent, ttl, current_tenant.get(), *request_key(request)
        )
        return self.session_info(child, engine)

    @unary("ExportSession")
    async def ExportSession(
        self, request: memserve_pb2.ExportSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionState:
        session, engine = await self.session(request.session_id, read=True)
        data, step = await engine.lifecycle.export(session)
        return memserve_pb2.SessionState(state=data, model=session.model, step=step)

    @unary("ImportSession")
    async def ImportSession(
        self, request: memserve_pb2.ImportSessionRequest, context: grpc.aio.ServicerContext
    ) -> memserve_pb2.SessionInfo:
        imported = import_state(request.state)
        engine = self.engine(imported.model)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        session = await engine.lifecycle.import_(
            imported, ttl, current_tenant.get(), *request_key(request)
        )
        return self.session_info(session, engine)

    async def Generate(
        self, request: memserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[memserve_pb2.GenerateResponse]:
        """Stream a dialogue model's reply to `text`, piece by piece, then a summary."""
        start = time.perf_counter()
        call: GenerateCall | None = None
        self.metrics.generations_in_flight.inc()
        try:
            async with self.admission.answering("Generate", request, context):
                session, engine = await self.session(request.session_id)
                sampling = Sampling.checked(
                    request.max_tokens,
                    engine.settings.max_new_tokens,
                    request.temperature if request.HasField("temperature") else None,
                    request.top_k,
                    request.top_p if request.HasField("top_p") else None,
                    list(request.stop),
                    request.presence_penalty if request.HasField("presence_penalty") else None,
                )
                seed = request.seed if request.HasField("seed") else None
                started = await engine.generate(
                    session, request.text, sampling, seed, *request_key(request),
                    charge=self.charge,
                )  # fmt: skip
                if isinstance(started, journal_pb2.Reply):  # a repeat: the reply again
                    for text in started.pieces:
                        yield memserve_pb2.GenerateResponse(text=text)
                    yield memserve_pb2.GenerateResponse(done=started.done)
                    return
                call = started
                last = None
                async for piece in call.stream():
                    now = time.perf_counter()
                    (engine.observe_itl if last else engine.observe_ttft)(now - (last or start))
                    last = now
                    yield memserve_pb2.GenerateResponse(text=piece)
                yield memserve_pb2.GenerateResponse(done=call.done_message())
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
        session, engine = await self.session(request.session_id)
        await engine.lifecycle.delete(session)
        return memserve_pb2.DeleteSessionResponse()


def request_key(request: Any) -> tuple[str, bytes]:
    """A request's id and the SHA-256 of everything else it asks (deterministic bytes), so
    that a repeat with other contents is told apart; ("", b"") without an id."""
    request_id: str = request.request_id
    if not request_id:
        return "", b""
    check_request_id(request_id)
    payload = type(request)()
    payload.CopyFrom(request)
    payload.ClearField("request_id")
    return request_id, hashlib.sha256(payload.SerializeToString(deterministic=True)).digest()

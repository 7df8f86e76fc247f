"""The RPC handlers of `inference.GRPCInferenceService`: the Open Inference Protocol (KServe
v2) with Triton's sequence extension, on the same port and the same engines as memserve.v1.

A sequence is a session: a request with `sequence_start` creates one (`lifecycle.create`),
every request steps it (`engine.step`) or runs a dialogue turn (`engine.generate`), and
`sequence_end` deletes it after its step, so sequences are batched, parked, durable and
exactly-once (the request's `id` is its request id) like every other session. Names map to
sessions in `serving.sequences`; messages to values in `serving.kserve_wire`; admission,
status codes and timing are `serving.rpc`'s (`method` label ModelInfer etc.). On
ModelStreamInfer an error answers its request with `error_message` and the stream goes on,
as in Triton. docs/kserve.md has every mapping and what differs from Triton.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from memserve import __version__
from protos import journal_pb2
from protos.inference import grpc_service_pb2 as v2
from serving import kserve_wire as wire
from serving.engine import ModelEngine
from serving.errors import InvalidArgument, NotFound
from serving.generation import Sampling, prompt_tokens, require_text
from serving.kserve_model import is_dialogue, model_config, model_metadata
from serving.kserve_stream import MessageContext, MessageFailedError, answer_stream
from serving.malformed import Malformed, lenient
from serving.metrics import Metrics
from serving.rpc import Admission, current_tenant, unary
from serving.sequences import SequenceSessions
from serving.sessions import Session, SessionTable

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("sequence", "sequence(string_id)", "model_configuration", "parameters")
VERSION = "1"  # every model has this one version
SESSION_PARAMETER = "memserve_session_id"  # on a START's response
FINAL = wire.FINAL


class KServeService:
    """Routes v2 calls to the engine of their model; `admission` is memserve.v1's, so the
    drain and the store's health refuse both APIs alike."""

    def __init__(
        self,
        engines: dict[str, ModelEngine],
        table: SessionTable,
        metrics: Metrics,
        admission: Admission,
    ) -> None:
        self.engines = engines
        self.table = table
        self.metrics = metrics
        self.admission = admission
        self.sequences = SequenceSessions(engines, table)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the methods implemented here; the protocol's others (repository, shared
        memory, statistics, trace, log settings) answer UNIMPLEMENTED."""
        descriptor = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        factories = {False: grpc.unary_unary_rpc_method_handler,
                     True: grpc.stream_stream_rpc_method_handler}  # fmt: skip
        handlers = {
            method.name: factories[method.client_streaming](
                getattr(self, method.name),
                request_deserializer=lenient(getattr(v2, method.input_type.name)),
                response_serializer=getattr(v2, method.output_type.name).SerializeToString,
            )
            for method in descriptor.methods
            if hasattr(self, method.name)
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def adopt(self, request_id: str, session_id: str, made: float) -> None:
        """A session found in the session store at start: if a START made it, its name."""
        self.sequences.names.adopt(request_id, session_id, made)

    def engine(self, model: str, version: str) -> ModelEngine:
        """The engine of a model the caller's tenant may use (as for an unknown model
        otherwise)."""
        engine = self.engines.get(model)
        if engine is None or not current_tenant.get().may_use(model):
            if not model:
                raise InvalidArgument("model_name is empty")
            raise NotFound(
                f"Request for unknown model: '{model}' is not found "
                f"(serving: {', '.join(self.engines)})"
            )
        if version not in ("", VERSION):
            raise NotFound(
                f"Request for unknown model: '{model}' version {version} is not found "
                f"(memserve serves version {VERSION} of each model)"
            )
        return engine

    # ------------------------------------------------------------------ health, metadata

    def _ready(self) -> bool:
        return not self.admission.draining and self.admission.unavailable is None

    async def _probe(self, method: str, answer: Any, context: Any, request: Any) -> Any:
        """Liveness and readiness answer while draining (not ready), unlike other calls."""
        start = time.perf_counter()
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request.type_name}")
        self.admission.observe_duration(method, grpc.StatusCode.OK, time.perf_counter() - start)
        return answer

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._probe("ServerLive", v2.ServerLiveResponse(live=True), context, request)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        ready = self._ready() and all(engine.worker.alive for engine in self.engines.values())
        answer = v2.ServerReadyResponse(ready=ready)
        return await self._probe("ServerReady", answer, context, request)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        engine = None if isinstance(request, Malformed) else self.engines.get(request.name)
        version_known = engine is not None and request.version in ("", VERSION)
        ready = version_known and self._ready() and engine is not None and engine.worker.alive
        return await self._probe("ModelReady", v2.ModelReadyResponse(ready=ready), context, request)

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return v2.ServerMetadataResponse(name="memserve", version=__version__,
                                         extensions=EXTENSIONS)  # fmt: skip

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        engine = self.engine(request.name, request.version)
        return model_metadata(engine.name, engine.card)

    @unary("ModelConfig")
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        engine = self.engine(request.name, request.version)
        return model_config(engine.name, engine.card, engine.settings.session_ttl)

    # ------------------------------------------------------------------ inference

    @unary("ModelInfer")
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """One request, one response (a dialogue model's whole reply in it)."""
        call = await self._prepare(request, streamed=False)
        if call.turn is None:
            return await self._step(call)
        answer = None
        async with contextlib.aclosing(self._reply(call, streamed=False)) as responses:
            async for response in responses:
                answer = response
        return answer

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Requests answered as they finish, concurrently; those of one sequence in the
        order they came (`serving.kserve_stream`). A dialogue reply comes as one response
        per piece (decoupled). An error answers its request, and the stream goes on."""
        stream = MessageContext(context)

        def answer(request: Any) -> Any:
            return self._answer(request, stream)

        async with contextlib.aclosing(answer_stream(request_iterator, answer)) as out:
            async for message in out:
                yield message

    async def _answer(self, request: Any, stream: MessageContext) -> Any:
        """One stream request's answer: a step model's response (or error), one message, as
        cheaply as StepStream answers; a dialogue turn's messages, as an async generator."""
        engine = None if isinstance(request, Malformed) else self.engines.get(request.model_name)
        if engine is not None and is_dialogue(engine.card):
            return self._answer_turn(request, stream)
        try:
            async with self.admission.answering("ModelStreamInfer", request, stream):
                call = await self._prepare(request, streamed=True)
                await self._step(call)
        except MessageFailedError as error:
            return wire.failed(request, str(error))
        return call.message  # sent after it is timed, as StepStream's

    async def _answer_turn(self, request: Any, stream: MessageContext) -> AsyncGenerator[Any, None]:
        failure = None
        try:
            async with self.admission.answering("ModelStreamInfer", request, stream):
                call = await self._prepare(request, streamed=True)
                async with contextlib.aclosing(self._reply(call, streamed=True)) as out:
                    async for message in out:
                        yield message
        except MessageFailedError as error:
            failure = wire.failed(request, str(error))
        if failure is not None:
            yield failure

    async def _prepare(self, request: Any, streamed: bool) -> Prepared:
        """Check everything, then find or start the sequence's session (nothing is touched
        before every check has passed)."""
        engine = self.engine(request.model_name, request.model_version)
        tenant = current_tenant.get()
        name, card = engine.name, engine.card
        control = wire.control(request.parameters, name)
        request_id, digest = wire.request_key(request)
        turn = None
        inputs, batched = None, False
        if is_dialogue(card):
            text = wire.text_input(request, name)
            prompt = prompt_tokens(require_text(engine.tokenizer, card, name), text,
                                   engine.settings.max_steps_per_call)  # fmt: skip
            parameters = wire.sampling_parameters(request.parameters)
            sampling = Sampling.checked(
                parameters.max_tokens, engine.settings.max_new_tokens, parameters.temperature,
                parameters.top_k, parameters.top_p, [], parameters.presence_penalty,
            )  # fmt: skip
            turn = wire.Turn(text, sampling, parameters.seed)
            steps = len(prompt) + 2 * sampling.max_tokens + 2  # at most, as memserve.v1's
            wanted = wire.wanted_outputs(request, (wire.REPLY, wire.STEP), name)
        else:
            inputs, batched = wire.step_inputs(
                request, name, card.input_size, engine.settings.max_steps_per_call
            )
            wanted = wire.wanted_outputs(request, (wire.OUTPUT, wire.STEP), name)
            steps = len(inputs)
        self.admission.usage_of(tenant).take_steps(tenant, steps)  # the step-rate quota
        session = await self.sequences.session(
            engine, tenant, control.sequence_id, control.start, request_id
        )
        # On a stream the response is built inside its ModelStreamInferResponse (no copy).
        message = v2.ModelStreamInferResponse() if streamed else v2.ModelInferResponse()
        response = message.infer_response if streamed else message
        response.model_name, response.model_version, response.id = name, VERSION, request.id
        if control.start:
            response.parameters[SESSION_PARAMETER].string_param = session.id
        return Prepared(engine, session, control, request_id, digest, message, response,
                        streamed, wanted, inputs, batched, turn)  # fmt: skip

    async def _step(self, call: Prepared) -> Any:
        """A step model's request; returns its response (filled in `call.message`)."""
        engine, session, response = call.engine, call.session, call.response
        assert call.inputs is not None
        outputs, step = await engine.step(session, call.inputs, None, call.request_id,
                                          call.digest)  # fmt: skip
        if call.control.end:
            await self.sequences.end(engine, session)
        if wire.OUTPUT in call.wanted:
            shape = (1, *outputs.shape) if call.batched else outputs.shape
            wire.add_fp32(response, wire.OUTPUT, outputs, shape)
        if wire.STEP in call.wanted:
            wire.add_int64(response, wire.STEP, step)
        if call.streamed:
            response.parameters[FINAL].bool_param = True
        return response

    async def _reply(self, call: Prepared, streamed: bool) -> AsyncGenerator[Any, None]:
        """A dialogue turn: streamed, one ModelStreamInferResponse per piece and a final one
        with the summary as parameters; else one response with the whole reply."""
        engine, session, turn, wanted = call.engine, call.session, call.turn, call.wanted
        assert turn is not None

        def response(text: str | None, final: bool) -> Any:
            message = v2.ModelStreamInferResponse() if streamed else v2.ModelInferResponse()
            answer = message.infer_response if streamed else message
            answer.CopyFrom(call.response)
            if text is not None and wire.REPLY in wanted:
                wire.add_text(answer, wire.REPLY, text)
            if streamed:
                answer.parameters[FINAL].bool_param = final
            return message

        start = time.perf_counter()
        generating = None
        self.metrics.generations_in_flight.inc()
        try:
            started = await engine.generate(session, turn.text, turn.sampling, turn.seed,
                                            call.request_id, call.digest)  # fmt: skip
            if isinstance(started, journal_pb2.Reply):  # a repeat: the reply again
                for piece in started.pieces if streamed else ():
                    yield response(piece, final=False)
                done = started.done
            else:
                generating = started
                last = None
                async for piece in generating.stream():
                    now = time.perf_counter()
                    (engine.observe_itl if last else engine.observe_ttft)(now - (last or start))
                    last = now
                    if streamed:
                        yield response(piece, final=False)
                done = generating.done_message()
            if call.control.end:
                await self.sequences.end(engine, session)
            empty = streamed and call.control.empty_final  # Triton's flags-only final response
            last_message = response(None if empty else ("" if streamed else done.text), True)
            final = last_message.infer_response if streamed else last_message
            if wire.STEP in wanted and not empty:
                wire.add_int64(final, wire.STEP, done.step)
            final.parameters["finish_reason"].string_param = done.finish_reason
            final.parameters["prompt_tokens"].int64_param = done.prompt_tokens
            final.parameters["completion_tokens"].int64_param = done.completion_tokens
            yield last_message
        finally:
            self.metrics.generations_in_flight.dec()
            if generating is not None:
                self.metrics.generated_tokens.labels(session.model).inc(len(generating.generated))
                if generating.future is not None and not generating.future.done():
                    generating.future.cancel()  # the caller left: stop at the next launch


@dataclass(slots=True)  # built for every request: no frozen-dataclass setattr
class Prepared:
    """A checked request and its session: what running it needs."""

    engine: ModelEngine
    session: Session
    control: wire.Control
    request_id: str
    digest: bytes
    message: Any  # what is sent: the response, or on a stream its ModelStreamInferResponse
    response: Any  # the ModelInferResponse so far (id, model, version, session parameter)
    streamed: bool
    wanted: tuple[str, ...]
    inputs: np.ndarray | None  # a step model's [T, input_size]
    batched: bool  # the inputs came as [1, T, input_size]
    turn: wire.Turn | None  # a dialogue model's

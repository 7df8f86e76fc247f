"""The workloads over gRPC: `step` (K Step calls of T random inputs per session) and `chat`
(K streamed Generate turns per session), the connection they share, and `GrpcTarget`, which
the schedules drive and which counts every call by method and status code. The benchmarks
(`bench/`) drive their own workloads (`Workload`) through the same target and schedules.

Stubs of `grpc.aio` straight from `protos/`, tensors through `protos/tensors.py`: nothing of
the server is imported, and a request costs the client as little as it can.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from clients.channel import ChannelOption, Metadata, call_metadata, channel_options, with_session
from clients.loadgen.recording import INVALID_RESPONSE, OK, CallCounts, Outcome, Recorder
from clients.loadgen.schedule import Session, SessionRefused, now
from clients.loadgen.settings import Settings
from clients.messages import DIALOGUE_TYPES
from protos import memserve_pb2, memserve_pb2_grpc, tensors

if TYPE_CHECKING:
    from clients.channel import TLS

INPUT_VARIANTS = 64  # step: distinct input tensors, drawn once, cycled through

# Short everyday utterances in the style of Persona-Chat (what vmed-chat was trained on):
# lower case, punctuation apart.
PROMPTS = (
    "hi ! how are you doing today ?",
    "i just got back from a long walk with my dog .",
    "what do you do for a living ?",
    "i love to cook italian food on the weekends .",
    "do you have any pets ?",
    "my favorite color is blue . what is yours ?",
    "i work as a nurse at the hospital downtown .",
    "have you ever been to europe ?",
    "i am a student , i study computer science .",
    "what kind of music do you like ?",
    "i play the guitar in a small band with my friends .",
    "that sounds like a lot of fun !",
    "i have two kids and a cat named max .",
    "do you like to read ?",
    "i am training for a marathon this spring .",
    "where did you grow up ?",
    "i grew up on a farm in the country , we had horses .",
    "what is your favorite food ?",
    "i enjoy hiking in the mountains when the weather is nice .",
    "i do not like cold weather much .",
    "are you married ?",
    "i just moved to a new city for my job .",
    "what do you like to do for fun ?",
    "tell me about your family .",
    "hello",
    "my parents own a small bakery and i help them on sundays .",
    "i watch a lot of movies , mostly comedies .",
    "how old are you ?",
)


class LoadgenError(Exception):
    """The run cannot start (the server is unreachable, the model unknown, ...)."""


def code_name(error: grpc.aio.AioRpcError) -> str:
    return str(error.code().name)


# ---------------------------------------------------------------------------- connection


class Connection:
    """Channels to the server (sessions use them round robin), the metadata of every call
    (the bearer token) and the sequence numbers of its sessions. `options` are the
    channels' options, whole."""

    def __init__(
        self,
        target: str,
        channels: int,
        options: Sequence[ChannelOption] = (),
        tls: TLS | None = None,
        token: str | None = None,
        protocol: str = "memserve",
    ) -> None:
        self.target = target
        self.protocol = protocol
        self.metadata: Metadata = call_metadata(token)
        if tls is None:
            self.channels = [grpc.aio.insecure_channel(target, options=list(options)) for _ in
                             range(channels)]  # fmt: skip
        else:
            credentials = tls.credentials()
            self.channels = [grpc.aio.secure_channel(target, credentials, list(options)) for _
                             in range(channels)]  # fmt: skip
        self.stubs: list[Any] = [
            memserve_pb2_grpc.MemServeStub(channel)  # type: ignore[no-untyped-call]
            for channel in self.channels
        ]
        if protocol == "kserve":  # the v2 inference API's stubs instead (clients/loadgen/kserve)
            from clients.loadgen.kserve import inference_stub

            self.stubs = [inference_stub(channel) for channel in self.channels]
        self.sessions = 0

    @classmethod
    def of(cls, settings: Settings) -> Connection:
        """The load generator's connection: straight to the server, one TCP connection per
        channel."""
        options = channel_options(settings.tls, [
            ("grpc.enable_http_proxy", 0),  # measure the server, not a proxy
            ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
        ])  # fmt: skip
        return cls(settings.target, settings.channels, options, settings.tls, settings.token,
                   settings.protocol)  # fmt: skip

    def next_session(self) -> tuple[int, Any]:
        """The next session's sequence number and the stub it talks over."""
        sequence = self.sessions
        self.sessions += 1
        return sequence, self.stubs[sequence % len(self.stubs)]

    async def connect(self, timeout: float) -> None:
        """Wait for every channel to be ready; LoadgenError after `timeout` seconds."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in self.channels)), timeout
            )
        except asyncio.TimeoutError:
            raise LoadgenError(
                f"cannot reach a server at {self.target} within {timeout:g} s (is "
                "`memserve serve` running there? see --target and --connect-timeout)"
            ) from None

    async def model_info(self, settings: Settings, calls: CallCounts) -> memserve_pb2.ModelInfo:
        """The workload's model as ListModels describes it; LoadgenError if it is not there
        or cannot do the workload."""
        if self.protocol == "kserve":
            return await self.kserve_model_info(settings, calls)
        try:
            answer = await self.stubs[0].ListModels(
                memserve_pb2.ListModelsRequest(), timeout=settings.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            calls.add("ListModels", code_name(error), error.details() or "")
            raise LoadgenError(
                f"ListModels at {self.target} failed: {code_name(error)}: {error.details()}"
            ) from None
        calls.add("ListModels", OK)
        models: dict[str, memserve_pb2.ModelInfo] = {m.name: m for m in answer.models}
        info = models.get(settings.model)
        if info is None:
            raise LoadgenError(
                f"no model {settings.model!r} on the server at {self.target} (it serves: "
                f"{', '.join(models) or 'nothing'}); see --model"
            )
        if settings.workload == "chat" and info.type not in DIALOGUE_TYPES:
            raise LoadgenError(
                f"model {settings.model!r} ({info.type}) does not generate text; the chat "
                f"workload needs a dialogue model ({', '.join(DIALOGUE_TYPES)}), e.g. vmed-chat"
            )
        return info

    async def kserve_model_info(
        self, settings: Settings, calls: CallCounts
    ) -> memserve_pb2.ModelInfo:
        """As `model_info`, from the v2 API's ModelMetadata."""
        from clients.loadgen.kserve import model_info

        try:
            info: memserve_pb2.ModelInfo = await model_info(
                self.stubs[0], settings.model, settings.timeout, self.metadata
            )
        except grpc.aio.AioRpcError as error:
            calls.add("ModelMetadata", code_name(error), error.details() or "")
            raise LoadgenError(
                f"ModelMetadata of {settings.model!r} at {self.target} failed: "
                f"{code_name(error)}: {error.details()}"
            ) from None
        calls.add("ModelMetadata", OK)
        if settings.workload == "chat" and info.type not in DIALOGUE_TYPES:
            raise LoadgenError(f"model {settings.model!r} ({info.type}) does not generate text")
        return info

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))


# ---------------------------------------------------------------------------- workloads


class Workload:
    """What a request is: its RPC (`method`), the CreateSession of the n-th session, and one
    request on a session; `release` lets go of what a session holds (an open stream) before
    it is deleted. A workload with `sequences` (the v2 API's) starts and ends its sessions
    with its own requests: it names a session (`name`), and `end`s one cut short."""

    method = ""
    sequences = False

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        raise NotImplementedError

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        """One request; raises grpc.aio.AioRpcError when the server refuses it."""
        raise NotImplementedError

    async def release(self, session: Session) -> None:
        """Before the session is deleted (nothing to do unless the workload holds a call)."""

    def name(self, sequence: int) -> str:
        raise NotImplementedError

    def unfinished(self, session: Session) -> bool:
        return False

    async def end(self, session: Session, timeout: float | None, metadata: Metadata) -> None:
        raise NotImplementedError


def step_outcome(
    response: memserve_pb2.StepResponse, steps: int, output_size: int, invalid: str
) -> Outcome:
    """A Step answer, just arrived: OK with its `steps`, or `invalid` if its outputs are not
    `steps x output_size` floats."""
    done = now()
    expected = steps * output_size * 4
    if len(response.outputs.data) != expected:
        detail = f"outputs of {len(response.outputs.data)} bytes, expected {expected}"
        return Outcome(invalid, done, detail)
    return Outcome(OK, done, steps=steps)


async def reply_outcome(stream: Any, invalid: str) -> Outcome:
    """A Generate call read to its end: OK with when each text piece came and what the final
    message says, or `invalid` if that message is missing or is not last."""
    pieces: list[float] = []
    done: memserve_pb2.GenerateDone | None = None
    finished = 0.0
    late = False
    async for message in stream:
        moment = now()
        if done is not None:
            late = True
        elif message.HasField("done"):
            done, finished = message.done, moment
        else:
            pieces.append(moment)
    if done is None or late:
        what = "a message after the final one" if late else "no final message"
        return Outcome(invalid, now(), f"the stream sent {what}")
    return Outcome(
        OK,
        finished,
        pieces=pieces,
        completion_tokens=done.completion_tokens,
        prompt_tokens=done.prompt_tokens,
        finish_reason=done.finish_reason or "?",
    )


class StepWorkload(Workload):
    """K Step calls of T inputs [T, input_size], uniform in [0, 1) from the seeded
    generator: INPUT_VARIANTS tensors drawn once and cycled through."""

    method = "Step"

    def __init__(self, settings: Settings, info: memserve_pb2.ModelInfo) -> None:
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        shape = (settings.steps_per_call, int(info.input_size))
        self.inputs = [tensors.encode(rng.random(shape, dtype=np.float32)) for _ in
                       range(INPUT_VARIANTS)]  # fmt: skip
        self.output_size = int(info.output_size)

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(
            model=self.settings.model, ttl_seconds=self.settings.session_ttl
        )

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        index = (session.sequence * self.settings.steps + session.used) % len(self.inputs)
        request = memserve_pb2.StepRequest(session_id=session.session_id, inputs=self.inputs[index])
        response = await session.stub.Step(request, timeout=timeout, metadata=metadata)
        return step_outcome(response, self.settings.steps_per_call, self.output_size,
                            INVALID_RESPONSE)  # fmt: skip


class ChatWorkload(Workload):
    """K turns of Generate: utterances in an order the seed shuffles, each session starting
    elsewhere in it; each session's sampler is seeded (--seed + its sequence number)."""

    method = "Generate"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        order = np.random.default_rng(settings.seed).permutation(len(settings.prompts))
        self.prompts = [settings.prompts[i] for i in order]

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(
            model=self.settings.model,
            ttl_seconds=self.settings.session_ttl,
            seed=self.settings.seed + sequence,
        )

    def generate_request(self, session: Session) -> memserve_pb2.GenerateRequest:
        settings = self.settings
        text = self.prompts[(session.sequence * settings.turns + session.used) % len(self.prompts)]
        request = memserve_pb2.GenerateRequest(
            session_id=session.session_id,
            text=text,
            max_tokens=settings.max_tokens,
            top_k=settings.top_k,
            stop=list(settings.stop),
        )
        if settings.temperature is not None:
            request.temperature = settings.temperature
        if settings.top_p is not None:
            request.top_p = settings.top_p
        return request

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        request = self.generate_request(session)
        stream = session.stub.Generate(request, timeout=timeout, metadata=metadata)
        return await reply_outcome(stream, INVALID_RESPONSE)


def make_workload(settings: Settings, info: memserve_pb2.ModelInfo) -> Workload:
    if settings.protocol == "kserve":
        from clients.loadgen.kserve import KServeChat, KServeStep

        return KServeStep(settings, info) if settings.workload == "step" else KServeChat(settings)
    if settings.workload == "step":
        return StepWorkload(settings, info)
    return ChatWorkload(settings)


# ---------------------------------------------------------------------------- target


class GrpcTarget:
    """The schedules' `Target` over gRPC for one level: every call counted into the level's
    recorder by method and status code (a call we cancel counts as CANCELLED). `timeout`:
    every call's deadline in seconds (None: none)."""

    def __init__(
        self,
        connection: Connection,
        workload: Workload,
        recorder: Recorder,
        timeout: float | None,
    ) -> None:
        self.connection = connection
        self.workload = workload
        self.recorder = recorder
        self.calls = recorder.calls
        self.timeout = timeout
        self.ready: deque[Session] = deque()  # made by `prepare`, for the first sessions

    async def prepare(self, count: int) -> None:
        """Create `count` sessions at once, now, for the level's first sessions (the
        benchmarks' levels start with their sessions in place); raises SessionRefused."""
        self.ready.extend(await asyncio.gather(*(self._create() for _ in range(count))))

    async def open_session(self) -> Session:
        return self.ready.popleft() if self.ready else await self._create()

    async def _create(self) -> Session:
        sequence, stub = self.connection.next_session()
        if self.workload.sequences:  # its first request starts it
            return Session(self.workload.name(sequence), sequence, stub)
        start = now()
        try:
            info = await stub.CreateSession(
                self.workload.session_request(sequence), timeout=self.timeout,
                metadata=self.connection.metadata,
            )  # fmt: skip
        except grpc.aio.AioRpcError as error:
            self.calls.add("CreateSession", code_name(error), error.details() or "")
            raise SessionRefused(code_name(error), error.details() or "") from None
        except asyncio.CancelledError:
            self.calls.add("CreateSession", "CANCELLED")
            raise
        self.calls.add("CreateSession", OK)
        self.recorder.session_calls["CreateSession"].record(now() - start)
        return Session(info.session_id, sequence, stub)

    async def close_session(self, session: Session) -> None:
        await self.workload.release(session)
        if self.workload.sequences:
            if self.workload.unfinished(session):
                await self._end(session)
            return
        if session.gone:  # the server no longer has it
            return
        start = now()
        request = memserve_pb2.DeleteSessionRequest(session_id=session.session_id)
        try:
            await session.stub.DeleteSession(
                request, timeout=self.timeout, metadata=self._metadata(session)
            )
        except grpc.aio.AioRpcError as error:
            self.calls.add("DeleteSession", code_name(error), error.details() or "")
            return
        except asyncio.CancelledError:
            self.calls.add("DeleteSession", "CANCELLED")
            raise
        self.calls.add("DeleteSession", OK)
        self.recorder.session_calls["DeleteSession"].record(now() - start)

    def _metadata(self, session: Session) -> Metadata:
        """Every call's metadata, with the session header (an edge routes by it)."""
        return with_session(self.connection.metadata, session.session_id)

    async def _end(self, session: Session) -> None:
        """A sequence cut short, ended by one more request, counted as its method."""
        method = self.workload.method
        try:
            await self.workload.end(session, self.timeout, self._metadata(session))
        except grpc.aio.AioRpcError as error:
            self.calls.add(method, code_name(error), error.details() or "")
            return
        except asyncio.CancelledError:
            self.calls.add(method, "CANCELLED")
            raise
        self.calls.add(method, OK)

    async def request(self, session: Session, intended: float) -> Outcome:
        method = self.workload.method
        try:
            outcome = await self.workload.call(session, self.timeout, self._metadata(session))
        except grpc.aio.AioRpcError as error:
            code, detail = code_name(error), error.details() or ""
            self.calls.add(method, code, detail)
            if code == "NOT_FOUND":
                session.gone = True
            return Outcome(code, now(), detail)
        except asyncio.CancelledError:
            self.calls.add(method, "CANCELLED")
            raise
        self.calls.add(method, OK)  # the server answered OK, whatever the answer held
        return outcome

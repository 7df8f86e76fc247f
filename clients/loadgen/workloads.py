"""The workloads over gRPC: `step` (K Step calls of T random inputs per session) and `chat`
(K streamed Generate turns per session), and `GrpcTarget`, which the schedules drive over a
`Connection` (connection.py) and which counts every call by method and status code. The
benchmarks (`bench/`) drive their own workloads (`Workload`, workload.py) through the same
target and schedules.

Every request (and CreateSession) carries a fresh request id from the client library
(`clients.retry.new_request_id`), and is retried as the library's `RetryPolicy` says (off
unless --attempts asks for it; DeleteSession is retried too, and a retry that finds the
session gone has deleted it): each attempt is a call, counted as the server counts it;
the request is recorded once, with its final outcome, its latency from its intended start
to that outcome, and a Generate reply's pieces as they first arrived (a retry replays the
reply from its start: what was already heard is skipped). The v2 workloads (`kserve.py`)
send no request ids and are never retried (settings.KSERVE_NO_RETRIES says why).

Stubs of `grpc.aio` straight from `protos/`, tensors through `protos/tensors.py`: nothing of
the server is imported, and a request costs the client as little as it can.
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc
import numpy as np

from clients.channel import Metadata, with_session
from clients.errors import MemserveError
from clients.loadgen import kserve
from clients.loadgen.connection import Connection, code_name
from clients.loadgen.recording import INVALID_RESPONSE, OK, Outcome, Recorder
from clients.loadgen.schedule import Session, SessionRefused, now
from clients.loadgen.settings import KSERVE_NO_RETRIES, Settings
from clients.loadgen.workload import Heard, Workload, reply_outcome, step_outcome
from clients.retry import NO_RETRIES, Deadline, RetryPolicy, new_request_id
from protos import memserve_pb2, tensors

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
        request = memserve_pb2.StepRequest(
            session_id=session.session_id, inputs=self.inputs[index], request_id=session.request_id
        )
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
            request_id=session.request_id,
        )
        if settings.temperature is not None:
            request.temperature = settings.temperature
        if settings.top_p is not None:
            request.top_p = settings.top_p
        return request

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        request = self.generate_request(session)
        stream = session.stub.Generate(request, timeout=timeout, metadata=metadata)
        if session.reply is None:
            session.reply = Heard()
        return await reply_outcome(stream, INVALID_RESPONSE, session.reply)


def make_workload(settings: Settings, info: memserve_pb2.ModelInfo) -> Workload:
    if settings.protocol == "kserve":
        if settings.workload == "step":
            return kserve.KServeStep(settings, info)
        return kserve.KServeChat(settings)
    if settings.workload == "step":
        return StepWorkload(settings, info)
    return ChatWorkload(settings)


# ---------------------------------------------------------------------------- target


class GrpcTarget:
    """The schedules' `Target` over gRPC for one level: every call counted into the level's
    recorder by method and status code (a call we cancel counts as CANCELLED). `timeout`:
    every request's deadline in seconds, its retries included (None: none); `retry`: when
    a request (or CreateSession, DeleteSession) is tried again (default: never; never for a
    workload of v2 sequences, whose requests carry no request id)."""

    def __init__(
        self,
        connection: Connection,
        workload: Workload,
        recorder: Recorder,
        timeout: float | None,
        retry: RetryPolicy = NO_RETRIES,
    ) -> None:
        if workload.sequences and retry.attempts > 1:
            raise ValueError(KSERVE_NO_RETRIES)
        self.connection = connection
        self.workload = workload
        self.recorder = recorder
        self.calls = recorder.calls
        self.timeout = timeout
        self.retry = retry
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
        request = self.workload.session_request(sequence)
        request.request_id = new_request_id()
        deadline = Deadline(self.timeout)
        attempt = 1
        while True:
            try:
                info = await stub.CreateSession(
                    request, timeout=self.retry.attempt_limit(deadline, attempt),
                    metadata=self.connection.metadata,
                )  # fmt: skip
            except grpc.aio.AioRpcError as error:
                self.calls.add("CreateSession", code_name(error), error.details() or "")
                delay = self._retry_after(error, attempt, deadline, "CreateSession")
                if delay is None:
                    raise SessionRefused(code_name(error), error.details() or "") from None
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except asyncio.CancelledError:
                self.calls.add("CreateSession", "CANCELLED")
                raise
            break
        self.calls.add("CreateSession", OK)
        self.recorder.session_calls["CreateSession"].record(now() - start)
        return Session(info.session_id, sequence, stub)

    def _retry_after(
        self, error: grpc.aio.AioRpcError, attempt: int, deadline: Deadline, method: str
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (every request is
        named by its request id, and deleting twice deletes once, so any failure the policy
        retries may be retried)."""
        failure = MemserveError(error.code(), error.details() or "", attempt)
        return self.retry.delay(failure, deadline.remaining(), method)

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
        deadline = Deadline(self.timeout)
        attempt = 1
        while True:
            try:
                await session.stub.DeleteSession(
                    request, timeout=self.retry.attempt_limit(deadline, attempt),
                    metadata=self._metadata(session),
                )  # fmt: skip
            except grpc.aio.AioRpcError as error:
                code = code_name(error)
                self.calls.add("DeleteSession", code, error.details() or "")
                if code == "NOT_FOUND" and attempt > 1:
                    break  # an earlier attempt deleted it, and its reply was lost
                delay = self._retry_after(error, attempt, deadline, "DeleteSession")
                if delay is None:
                    return
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except asyncio.CancelledError:
                self.calls.add("DeleteSession", "CANCELLED")
                raise
            self.calls.add("DeleteSession", OK)
            break
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
        """One request, tried again as `retry` allows with the same request id; its
        outcome (recorded once by the schedule) is the last attempt's."""
        method = self.workload.method
        session.request_id, session.reply = new_request_id(), None
        deadline = Deadline(self.timeout)
        attempt = 1
        while True:
            try:
                outcome = await self.workload.call(
                    session, self.retry.attempt_limit(deadline, attempt), self._metadata(session)
                )
            except grpc.aio.AioRpcError as error:
                code, detail = code_name(error), error.details() or ""
                self.calls.add(method, code, detail)
                delay = self._retry_after(error, attempt, deadline, method)
                if delay is None:
                    if code == "NOT_FOUND":
                        session.gone = True
                    return Outcome(code, now(), detail)
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except asyncio.CancelledError:
                self.calls.add(method, "CANCELLED")
                raise
            self.calls.add(method, OK)  # the server answered OK, whatever the answer held
            return outcome

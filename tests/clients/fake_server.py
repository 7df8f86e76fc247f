"""A stand-in MemServe for what a real server cannot be made to do on cue: fail the first
attempts of a call with UNAVAILABLE (optionally after doing the work, as when a reply is
lost on the way back), cut a Generate reply after some pieces, reply differently to a retry,
hold a call's reply at a chosen point until the test lets it go (to interrupt the client
while it waits, or let an attempt's time run out), record every call's metadata, request
id and the deadline it arrived with. (TLS and keys: a real server, test_secure_server.py.)

It is a real gRPC server on a loopback port with a small in-memory session table: steps
double their inputs, Generate echoes the text. Its one model, "fake", is listed as a
dialogue model (type vmed), since it answers Generate. Like memserve, it answers a repeated
request id with the first call's answer (Generate: the reply again from its start) and
runs nothing, unless `remember` is off.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos import memserve_pb2, memserve_pb2_grpc, tensors

Context = Any  # grpc.ServicerContext; grpc has no type hints
NO_DEADLINE = 1e9  # seconds left: more than this is no deadline at all
RELEASE_SECONDS = 120  # a hold never released goes on after this, so that no call hangs


@dataclass
class Hold:
    """The next call of a method, held after its work and before its reply: `entered` is
    set when it gets there, it goes on once `release` is set (or after RELEASE_SECONDS), and
    `left` is set when it does."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    left: threading.Event = field(default_factory=threading.Event)

    def wait_entered(self, timeout: float = 30) -> None:
        assert self.entered.wait(timeout), "the held call never came"


class FakeMemServe(memserve_pb2_grpc.MemServeServicer):
    """Attempts of `method` up to number `failures[method]` fail with UNAVAILABLE; for the
    methods in `lose_replies` those attempts do their work first (see `fail_next`)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.failure_codes: dict[str, grpc.StatusCode] = {}
        self.lose_replies: set[str] = set()
        self.remember = True  # answer a repeated request id from `answers`
        self.answers: dict[tuple[str, str], tuple[bytes, Any]] = {}  # (method, id): (asked, answer)
        self.request_ids: list[tuple[str, str]] = []  # (method, request_id) of every attempt
        self.cut_replies: list[int] = []  # Generate attempts to cut after this many pieces
        self.replies: list[list[str]] = []  # Generate attempts to answer with these pieces
        self.holds: dict[str, Hold] = {}  # by method, until its next call takes it
        self.every_hold: list[Hold] = []
        self.attempts: Counter[str] = Counter()
        self.metadata: list[tuple[str, dict[str, str]]] = []
        self.deadlines: list[tuple[str, float | None]] = []  # seconds left as each came; None
        self.steps: dict[str, int] = {}
        self.lock = threading.Lock()

    def fail_next(
        self,
        method: str,
        count: int,
        lose_replies: bool = False,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> None:
        """Fail the next `count` attempts of `method` with `code` (UNAVAILABLE); with
        `lose_replies`, after doing their work."""
        with self.lock:
            self.failures[method] = self.attempts[method] + count
            self.failure_codes[method] = code
            if lose_replies:
                self.lose_replies.add(method)

    def ids(self, method: str) -> list[str]:
        """The request id each attempt of `method` carried, in order."""
        return [request_id for name, request_id in self.request_ids if name == method]

    def _earlier(self, method: str, request: Any, context: Context) -> Any:
        """The answer of an earlier call with this request's id (INVALID_ARGUMENT if it
        asked otherwise), or None."""
        if not request.request_id or not self.remember:
            return None
        asked = self._asked(request)
        with self.lock:
            found = self.answers.get((method, request.request_id))
        if found is None:
            return None
        if found[0] != asked:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake: request id reused")
        return found[1]

    def _answered(self, method: str, request: Any, answer: Any) -> None:
        if request.request_id:
            with self.lock:
                self.answers[(method, request.request_id)] = (self._asked(request), answer)

    @staticmethod
    def _asked(request: Any) -> bytes:
        payload = type(request)()
        payload.CopyFrom(request)
        payload.ClearField("request_id")
        return bytes(payload.SerializeToString(deterministic=True))

    def hold(self, method: str) -> Hold:
        """Hold the next call of `method` (ListModels, CreateSession, Step, a StepStream
        request, DeleteSession) after its work, or a Generate after its first piece (or
        before it: "GenerateStart"), until released."""
        hold = self.holds[method] = Hold()
        self.every_hold.append(hold)
        return hold

    def _held(self, method: str) -> None:
        hold = self.holds.pop(method, None)
        if hold is not None:
            hold.entered.set()
            hold.release.wait(RELEASE_SECONDS)
            hold.left.set()

    def release_all(self) -> None:
        for hold in self.every_hold:
            hold.release.set()

    def _attempt(self, method: str, context: Context, request: Any = None) -> bool:
        """Count and record an attempt; whether it is to fail (UNAVAILABLE, unless
        `fail_next` said otherwise)."""
        with self.lock:
            self.attempts[method] += 1
            self.metadata.append((method, dict(context.invocation_metadata())))
            if request is not None and hasattr(request, "request_id"):
                self.request_ids.append((method, request.request_id))
            left = context.time_remaining()  # gRPC's "infinite future" without a deadline
            self.deadlines.append((method, None if left is None or left > NO_DEADLINE else left))
            failing = self.attempts[method] <= self.failures[method]
        if failing and method not in self.lose_replies:
            code = self.failure_codes.get(method, grpc.StatusCode.UNAVAILABLE)
            context.abort(code, "fake: draining")
        return failing

    def _lose_reply(self, context: Context) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "fake: the connection broke")

    def _session(self, session_id: str, context: Context) -> int:
        if session_id not in self.steps:
            context.abort(grpc.StatusCode.NOT_FOUND, f"fake: no session {session_id}")
        return self.steps[session_id]

    def _new(self, model: str, step: int = 0) -> memserve_pb2.SessionInfo:
        with self.lock:
            session_id = f"fake-{len(self.steps)}"
            self.steps[session_id] = step
        return memserve_pb2.SessionInfo(session_id=session_id, model=model, step=step)

    def _step(
        self, request: memserve_pb2.StepRequest, context: Context
    ) -> memserve_pb2.StepResponse:
        step = self._session(request.session_id, context)
        if request.HasField("expected_step") and request.expected_step != step:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"fake: expected_step is {request.expected_step} but the session is at {step}",
            )
        inputs = tensors.decode(request.inputs, "inputs")
        self.steps[request.session_id] = step + len(inputs)
        return memserve_pb2.StepResponse(
            outputs=tensors.encode(inputs * 2), step=self.steps[request.session_id]
        )

    def ListModels(self, request: Any, context: Context) -> memserve_pb2.ListModelsResponse:  # noqa: N802
        failing = self._attempt("ListModels", context)
        if failing:
            self._lose_reply(context)
        self._held("ListModels")
        model = memserve_pb2.ModelInfo(name="fake", type="vmed", input_size=2, output_size=2)
        return memserve_pb2.ListModelsResponse(models=[model])

    def CreateSession(self, request: Any, context: Context) -> memserve_pb2.SessionInfo:  # noqa: N802
        failing = self._attempt("CreateSession", context, request)
        info = self._earlier("CreateSession", request, context) or self._new(request.model)
        self._answered("CreateSession", request, info)
        self._held("CreateSession")
        if failing:
            self._lose_reply(context)
        return info

    def Step(self, request: Any, context: Context) -> memserve_pb2.StepResponse:  # noqa: N802
        failing = self._attempt("Step", context, request)
        response = self._earlier("Step", request, context) or self._step(request, context)
        self._answered("Step", request, response)
        self._held("Step")
        if failing:
            self._lose_reply(context)
        return response

    def StepStream(self, request_iterator: Any, context: Context) -> Iterator[Any]:  # noqa: N802
        for number, request in enumerate(request_iterator):
            if number == 0:  # as memserve does, answer the call once its first request is in
                self._attempt("StepStream", context)
            response = self._step(request, context)
            self._held("StepStream")
            yield response

    def GetSession(self, request: Any, context: Context) -> memserve_pb2.SessionInfo:  # noqa: N802
        self._attempt("GetSession", context)
        step = self._session(request.session_id, context)
        return memserve_pb2.SessionInfo(session_id=request.session_id, model="fake", step=step)

    def ForkSession(self, request: Any, context: Context) -> memserve_pb2.SessionInfo:  # noqa: N802
        failing = self._attempt("ForkSession", context, request)
        info = self._earlier("ForkSession", request, context) or self._new(
            "fake", self._session(request.session_id, context)
        )
        self._answered("ForkSession", request, info)
        if failing:
            self._lose_reply(context)
        return info

    def ExportSession(self, request: Any, context: Context) -> memserve_pb2.SessionState:  # noqa: N802
        self._attempt("ExportSession", context)
        step = self._session(request.session_id, context)
        return memserve_pb2.SessionState(state=str(step).encode(), model="fake", step=step)

    def ImportSession(self, request: Any, context: Context) -> memserve_pb2.SessionInfo:  # noqa: N802
        failing = self._attempt("ImportSession", context, request)
        info = self._earlier("ImportSession", request, context) or self._new(
            "fake", int(request.state.decode())
        )
        self._answered("ImportSession", request, info)
        if failing:
            self._lose_reply(context)
        return info

    def DeleteSession(self, request: Any, context: Context) -> memserve_pb2.DeleteSessionResponse:  # noqa: N802
        failing = self._attempt("DeleteSession", context)
        self._session(request.session_id, context)
        del self.steps[request.session_id]
        self._held("DeleteSession")
        if failing:
            self._lose_reply(context)
        return memserve_pb2.DeleteSessionResponse()

    def Generate(self, request: Any, context: Context) -> Iterator[memserve_pb2.GenerateResponse]:  # noqa: N802
        """The pieces "you", " said", ": ", text (or the next of `replies`), then the done
        message; an attempt in `cut_replies` ends UNAVAILABLE after that many pieces, its turn
        undone (as memserve undoes a turn cut short)."""
        self._attempt("Generate", context, request)
        earlier = self._earlier("Generate", request, context)
        if earlier is not None:
            pieces, done = earlier
            for piece in pieces:
                yield memserve_pb2.GenerateResponse(text=piece)
            yield memserve_pb2.GenerateResponse(done=done)
            return
        self._held("GenerateStart")
        step = self._session(request.session_id, context)
        with self.lock:
            pieces = self.replies.pop(0) if self.replies else ["you", " said", ": ", request.text]
            cut = self.cut_replies.pop(0) if self.cut_replies else None
        for number, piece in enumerate(pieces):
            if number == cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake: the connection broke")
            yield memserve_pb2.GenerateResponse(text=piece)
            if number == 0:
                self._held("Generate")
        self.steps[request.session_id] = step + len(pieces)
        done = memserve_pb2.GenerateDone(
            finish_reason="eos", completion_tokens=len(pieces), text="".join(pieces),
            step=self.steps[request.session_id],
        )  # fmt: skip
        self._answered("Generate", request, (pieces, done))
        yield memserve_pb2.GenerateResponse(done=done)

    def calls_with(self, key: str) -> list[str]:
        """The methods of the calls whose metadata held `key`."""
        return [method for method, metadata in self.metadata if key in metadata]


class FakeServer:
    """A `FakeMemServe` on a loopback port."""

    def __init__(self) -> None:
        self.service = FakeMemServe()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        memserve_pb2_grpc.add_MemServeServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.service.release_all()
        self.server.stop(None)

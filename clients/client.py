"""The blocking client: `Client` has one method per RPC of memserve.v1.MemServe, and
`client.session(model)` gives a `Session` that tracks its step count and is deleted when its
`with` block ends. `clients/aio.py` is the same for asyncio.

Every call has a deadline (the client's `timeout`, or the call's own), is retried on
UNAVAILABLE when it is safe to repeat (`clients/retry.py`), and fails with `MemserveError`.
"""

from __future__ import annotations

import queue
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from clients import messages
from clients.channel import TLS, ChannelOption, call_metadata, channel_options, resolve_tls
from clients.errors import MemserveError
from clients.messages import Array, GenerateDone, ModelInfo, SessionInfo, SessionState, Stepped
from clients.options import DEFAULT_TARGET
from clients.retry import Deadline, RetryPolicy
from protos import memserve_pb2, memserve_pb2_grpc

DEFAULT_TIMEOUT = 30.0


class Client:
    """A blocking connection to a memserve server.

    `timeout`: seconds each call may take (its attempts and backoff together), unless the
    call passes its own; None: no deadline. `tls`: True (default roots) or `TLS(...)`;
    `token`: sent as `authorization: Bearer <token>` with every call. `retry`: see
    `RetryPolicy`. `options`: extra gRPC channel options. Thread-safe; close it (or use
    `with`) when done.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: bool | TLS | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        options: Sequence[ChannelOption] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.metadata = call_metadata(token)
        settings = resolve_tls(tls)
        all_options = channel_options(settings, options)
        if settings is None:
            self.channel = grpc.insecure_channel(target, options=all_options)
        else:
            self.channel = grpc.secure_channel(target, settings.credentials(), all_options)
        self.stub: Any = memserve_pb2_grpc.MemServeStub(self.channel)  # type: ignore[no-untyped-call]
        self.streams: weakref.WeakSet[StepStream] = weakref.WeakSet()  # open, for close()

    # ------------------------------------------------------------------ plumbing

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """One unary call with the deadline and retry policy; None when a retried
        DeleteSession found its session already gone."""
        rpc = getattr(self.stub, method)
        deadline = Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            try:
                return rpc(request, timeout=deadline.remaining(), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = MemserveError.from_rpc(rpc_error, attempt)
            delay = self.retry.after_failure(method, request, error, deadline)
            if delay is None:
                return None
            time.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------ RPCs

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._unary("ListModels", memserve_pb2.ListModelsRequest(), timeout)
        return [messages.model_info(model) for model in reply.models]

    def create_session(
        self,
        model: str,
        *,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> SessionInfo:
        request = messages.create_request(model, ttl_seconds, seed)
        return messages.session_info(self._unary("CreateSession", request, timeout))

    def session(
        self,
        model: str,
        *,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Session:
        """A new session of `model`, deleted when its `with` block ends."""
        info = self.create_session(model, ttl_seconds=ttl_seconds, seed=seed, timeout=timeout)
        return Session(self, info)

    def step(
        self,
        session_id: str,
        inputs: Array,
        *,
        expected_step: int | None = None,
        timeout: float | None = None,
    ) -> Stepped[Array]:
        """Run `inputs` `[T, input_size]` through the session: T steps in order. With
        `expected_step` the server refuses (FAILED_PRECONDITION) unless the session is at
        that step count, and the call is retried on UNAVAILABLE; without it, never."""
        request = messages.step_request(session_id, inputs, expected_step)
        return messages.stepped(self._unary("Step", request, timeout), inputs)

    def step_stream(self, session_id: str, *, timeout: float | None = None) -> StepStream:
        """One long-lived StepStream call for the session; `timeout` bounds the whole
        stream (default: no deadline). Close it, or use `with`."""
        return StepStream(self, session_id, timeout)

    def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        request = memserve_pb2.GetSessionRequest(session_id=session_id)
        return messages.session_info(self._unary("GetSession", request, timeout))

    def fork_session(
        self, session_id: str, *, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        """A new session whose state is a copy of this one's; the two evolve apart."""
        request = memserve_pb2.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return messages.session_info(self._unary("ForkSession", request, timeout))

    def export_session(self, session_id: str, *, timeout: float | None = None) -> SessionState:
        request = memserve_pb2.ExportSessionRequest(session_id=session_id)
        return messages.session_state(self._unary("ExportSession", request, timeout))

    def import_session(
        self, state: bytes, *, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        """A new session from `export_session(...).state` (of this server or another)."""
        request = memserve_pb2.ImportSessionRequest(state=state, ttl_seconds=ttl_seconds)
        return messages.session_info(self._unary("ImportSession", request, timeout))

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        request = memserve_pb2.DeleteSessionRequest(session_id=session_id)
        self._unary("DeleteSession", request, timeout)

    def generate(
        self,
        session_id: str,
        text: str,
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Generation:
        """Start a dialogue model's reply to `text`: iterate the returned `Generation` for
        its pieces. Unset options take the server's defaults (max_tokens 0: the server's
        limit; temperature 1; top_k 0: all; top_p 1; seed: the session's)."""
        request = messages.generate_request(
            session_id, text, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop,
        )  # fmt: skip
        return Generation(self._generate_call(request, timeout))

    def _generate_call(self, request: memserve_pb2.GenerateRequest, timeout: float | None) -> Any:
        return self.stub.Generate(request, timeout=self._timeout(timeout), metadata=self.metadata)

    def close(self) -> None:
        """Cancel the step streams still open, then close the channel."""
        for stream in list(self.streams):
            stream.cancel()
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Generation:
    """A reply being generated: iterate it for the text pieces as they are decoded; then
    `done` holds how it ended. `cancel()` stops it (from another thread or a signal handler
    too): the iteration then ends quietly and `done` stays None. `result()` waits for the
    end and returns `done`."""

    def __init__(
        self, call: Any, on_end: Callable[[GenerateDone | None], None] | None = None
    ) -> None:
        self._call = call
        self._on_end = on_end
        self._ended = False
        self.done: GenerateDone | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            self._end()
            if self.cancelled:
                raise
            raise messages.ended_early() from None
        except grpc.RpcError as rpc_error:
            self._end()
            if self.cancelled:
                raise StopIteration from None
            raise MemserveError.from_rpc(rpc_error) from None
        piece = messages.piece_or_done(message)
        if isinstance(piece, GenerateDone):
            self.done = piece
            self._end()
            raise StopIteration
        return piece

    def _end(self) -> None:
        self._ended = True
        if self._on_end is not None:
            self._on_end(self.done)

    def cancel(self) -> None:
        """Stop the reply: the server stops at its next launch, and the partial reply is not
        written into the session's memory (the user's text may be, in part or whole)."""
        self.cancelled = True
        self._call.cancel()

    def result(self) -> GenerateDone:
        """The end of the reply (the rest of the pieces are consumed); MemserveError
        CANCELLED if it was cancelled."""
        for _ in self:
            pass
        if self.done is None:
            raise MemserveError(grpc.StatusCode.CANCELLED, "the generation was cancelled")
        return self.done


class StepStream:
    """Steps of one session over one long-lived StepStream call, answered in order.

    A stream that met an error or an interrupt is over (the server ends the call, or it is
    cancelled): open a new one. Opened from a `Session`, each step carries the session's
    step count as `expected_step` and updates it. Close it, or use `with` (a block that
    raises cancels it); one left open ends with its `Session`'s block, or is cancelled when
    its client closes.
    """

    def __init__(
        self,
        client: Client,
        session_id: str,
        timeout: float | None,
        session: Session | None = None,
    ) -> None:
        self.session_id = session_id
        self._session = session
        self._requests: queue.SimpleQueue[memserve_pb2.StepRequest | None] = queue.SimpleQueue()
        self._call: Any = client.stub.StepStream(
            iter(self._requests.get, None), timeout=timeout, metadata=client.metadata
        )
        self.closed = False
        # gRPC reads the requests in a thread of its own until the None that ends them:
        # put it there even if the stream is dropped without being closed.
        weakref.finalize(self, self._requests.put, None)
        client.streams.add(self)
        if session is not None:
            session.streams.add(self)

    def step(self, inputs: Array, *, expected_step: int | None = None) -> Stepped[Array]:
        """Send `inputs` `[T, input_size]` and wait for their outputs."""
        if self.closed:
            raise MemserveError(grpc.StatusCode.FAILED_PRECONDITION, "the stream is closed")
        if self._session is not None and expected_step is None:
            expected_step = self._session.synced_step()
        self._requests.put(messages.step_request(self.session_id, inputs, expected_step))
        try:
            response = next(self._call)
        except grpc.RpcError as rpc_error:
            self._fail()
            raise MemserveError.from_rpc(rpc_error) from None
        except StopIteration:
            self._fail()
            raise MemserveError(grpc.StatusCode.INTERNAL, "the stream ended early") from None
        except BaseException:  # Ctrl-C: its reply would answer the next step
            self._fail()
            raise
        result = messages.stepped(response, inputs)
        if self._session is not None:
            self._session.step_count = result.step
        return result

    def _fail(self) -> None:
        """The stream is over, and the session's step count unknown."""
        self.cancel()
        if self._session is not None:
            self._session.stale = True

    def cancel(self) -> None:
        """End the stream at once, without waiting for the server (it sees CANCELLED)."""
        if not self.closed:
            self.closed = True
            self._requests.put(None)
        self._call.cancel()

    def close(self) -> None:
        """End the stream (the server finishes it normally)."""
        if self.closed:
            return
        self.closed = True
        self._requests.put(None)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # it ended anyway

    def __enter__(self) -> StepStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:  # whatever went wrong, do not wait on the server
            self.cancel()


class SessionBase:
    """What `Session` and `AsyncSession` know of their session: its id, model and step
    count, and whether that count may be out of date (`stale`: after a call that failed or
    was cancelled, or a reply not read to its end)."""

    def __init__(self, info: SessionInfo) -> None:
        self.id = info.session_id
        self.model = info.model
        self.step_count = info.step
        self.stale = False
        self.deleted = False

    def _generated(self, done: GenerateDone | None) -> None:
        if done is not None:
            self.step_count, self.stale = done.step, False

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.id!r}, model={self.model!r}, step_count={self.step_count})"


class Session(SessionBase):
    """A session on the server, used by one client at a time; deleted when its `with`
    block ends (or by `delete()`).

    It tracks the session's step count (`step_count`) and sends it as `expected_step` with
    each step, which makes steps safe to retry and refuses them (FAILED_PRECONDITION) if
    something else stepped the session meanwhile. After any failed or cancelled call the
    count is re-read (GetSession) before the next step.
    """

    def __init__(self, client: Client, info: SessionInfo) -> None:
        super().__init__(info)
        self.client = client
        self.streams: weakref.WeakSet[StepStream] = weakref.WeakSet()  # open, for __exit__

    def synced_step(self, timeout: float | None = None) -> int:
        """The step count, re-read from the server if a call may have changed it unseen."""
        if self.stale:
            self.info(timeout=timeout)
        return self.step_count

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        """The session as the server sees it now (and its step count, taken over)."""
        info = self.client.get_session(self.id, timeout=timeout)
        self.step_count, self.stale = info.step, False
        return info

    def step(self, inputs: Array, *, timeout: float | None = None) -> Array:
        """The outputs `[T, output_size]` of inputs `[T, input_size]`."""
        expected = self.synced_step(timeout)
        try:
            result = self.client.step(self.id, inputs, expected_step=expected, timeout=timeout)
        except BaseException:  # failed, or interrupted: the steps may have run
            self.stale = True
            raise
        self.step_count = result.step
        return result.outputs

    def step_stream(self, *, timeout: float | None = None) -> StepStream:
        return StepStream(self.client, self.id, timeout, session=self)

    def generate(
        self,
        text: str,
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Generation:
        """The reply to `text` (see `Client.generate`); the step count follows it."""
        request = messages.generate_request(
            self.id, text, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop,
        )  # fmt: skip
        call = self.client._generate_call(request, timeout)
        self.stale = True  # until the reply's end says where the session is
        return Generation(call, on_end=self._generated)

    def fork(self, *, ttl_seconds: float | None = None, timeout: float | None = None) -> Session:
        """A new session continuing from this one's state; both evolve independently."""
        return Session(
            self.client, self.client.fork_session(self.id, ttl_seconds=ttl_seconds, timeout=timeout)
        )

    def export(self, *, timeout: float | None = None) -> bytes:
        """The state as bytes that `Client.import_session` turns into a new session."""
        state = self.client.export_session(self.id, timeout=timeout)
        self.step_count, self.stale = state.step, False
        return state.state

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete the session; a session already gone (deleted, expired) is fine."""
        if self.deleted:
            return
        try:
            self.client.delete_session(self.id, timeout=timeout)
        except MemserveError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
        self.deleted = True

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for stream in list(self.streams):  # left open: end them, as their own `with` would
            if kind is None:
                stream.close()
            else:
                stream.cancel()
        try:
            self.delete()
        except MemserveError:
            if kind is None:
                raise  # else the block's own exception is the one to see

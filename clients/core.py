"""The client, once: deadlines and retries, a session's step bookkeeping, step streams and
Generate, for both faces of the library.

The logic is written here as coroutines over the little each face does itself: send one
attempt of a unary call (`_attempt`), sleep before the next (`_pause`), and exchange or read
messages on a stream. `aio.py` awaits these coroutines on `grpc.aio`; `client.py` gives them
blocking I/O, which never suspends, so each of them ends at its first `send` (`finish`).
What every unary RPC sends and how its reply reads is `calls.py`.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import grpc

from clients import calls, messages
from clients.calls import Call
from clients.channel import (
    TLS,
    ChannelOption,
    call_metadata,
    channel_options,
    resolve_tls,
    with_session,
)
from clients.errors import MemserveError
from clients.messages import Array, GenerateDone, Sampling, SessionInfo, Stepped
from clients.options import DEFAULT_TARGET
from clients.retry import Deadline, RetryPolicy
from protos import memserve_pb2, memserve_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_TIMEOUT = 30.0

R = TypeVar("R")
ClientT = TypeVar("ClientT", bound="ClientCore")


def finish(coroutine: Coroutine[Any, Any, R]) -> R:
    """The result of a coroutine of this module run with blocking I/O: it never suspends,
    so it ends at its first step (its exceptions, Ctrl-C included, come out here)."""
    try:
        coroutine.send(None)
    except StopIteration as end:
        result: R = end.value
        return result
    coroutine.close()
    raise RuntimeError("a blocking call suspended: it awaited something of asyncio")


class ClientCore(ABC):
    """What `Client` and `AsyncClient` are, whichever way they wait (see `Client`)."""

    grpc_module: ClassVar[Any]  # grpc or grpc.aio: the face's channels and calls

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
            self.channel = self.grpc_module.insecure_channel(target, options=all_options)
        else:
            credentials = settings.credentials()
            self.channel = self.grpc_module.secure_channel(target, credentials, all_options)
        self.stub: Any = memserve_pb2_grpc.MemServeStub(self.channel)  # type: ignore[no-untyped-call]
        self.streams: weakref.WeakSet[StepStreamCore] = weakref.WeakSet()  # open ones
        self.closed = False

    def _deadline(self, timeout: float | None) -> float | None:
        """A call's deadline in seconds: its own `timeout`, else the client's."""
        return self.timeout if timeout is None else timeout

    @abstractmethod
    async def _attempt(self, method: str, request: Any, timeout: float | None) -> Any:
        """One attempt of a unary call: its reply; grpc.RpcError if it failed."""

    @abstractmethod
    async def _pause(self, seconds: float) -> None:
        """Wait before the next attempt."""

    async def _call(self, call: Call[R], timeout: float | None) -> R:
        """`call` within its deadline, its attempts and the waits between them together,
        each attempt within the policy's `attempt_timeout` too, tried again as far as
        `retry` allows (`clients/retry.py`); MemserveError if it fails."""
        deadline = Deadline(self._deadline(timeout))
        attempt = 1
        while True:
            limit = self.retry.attempt_limit(deadline, attempt)
            try:
                reply = await self._attempt(call.method, call.request, limit)
            except grpc.RpcError as rpc_error:
                error = MemserveError.from_rpc(rpc_error, attempt)
            else:
                return call.parse(reply)
            delay = self.retry.after_failure(call.method, call.request, error, deadline)
            if delay is None:  # a retried DeleteSession found its session gone: done
                return call.parse(None)
            await self._pause(delay)
            attempt += 1

    def _cancel_streams(self) -> None:
        """Cancel the step streams still open (before the channel closes)."""
        self.closed = True
        for stream in list(self.streams):
            stream.cancel()


class GenerationCore(ABC):
    """A reply being generated (see `Generation`): one Generate call, retried as far as the
    client's `RetryPolicy` allows, and resumed: a retry gets the whole reply again from its
    start (the server's answer to a repeated request id, or the same reply made again by a
    turn that was undone), of which the pieces the caller already has are skipped. The face
    reads the call's messages (`_receive`)."""

    def __init__(
        self,
        client: ClientCore,
        request: memserve_pb2.GenerateRequest,
        timeout: float | None,
        on_end: Callable[[GenerateDone | None], None] | None = None,
    ) -> None:
        self.client = client
        self.request = request
        self.request_id: str = request.request_id
        self._deadline = Deadline(client._deadline(timeout))
        self._on_end = on_end
        self._ended = False
        self.done: GenerateDone | None = None
        self.cancelled = False
        self.attempts = 1
        self._given = ""  # the text handed to the caller so far
        self._heard = ""  # the text the current attempt has sent so far
        self._resuming = False  # the current attempt has not yet caught up with `_given`
        self._expired = False  # the current attempt waited past the policy's attempt_timeout
        self._answered = False  # the current attempt has had a message
        self._call: Any = self._open()

    def _open(self) -> Any:
        """Start an attempt: the same request (the same request id) every time."""
        self._heard, self._expired, self._resuming = "", False, bool(self._given)
        self._answered = False
        metadata = with_session(self.client.metadata, self.request)
        return self.client.stub.Generate(
            self.request, timeout=self._deadline.remaining(), metadata=metadata
        )

    @abstractmethod
    async def _receive(self, limit: float | None) -> memserve_pb2.GenerateResponse | None:
        """The current attempt's next message; None at its end (or once `cancel` or
        `_expire` ended it). After `limit` seconds without one (None: no limit), the face
        calls `_expire`."""

    def _expire(self, call: Any) -> None:
        """`call` waited past the attempt's time limit: end it (and retry, if allowed)."""
        if call is self._call and not self._ended:
            self._expired = True
            call.cancel()

    async def _next_piece(self) -> str | None:
        """The next piece of text; None when the reply has ended (`done` says how, or it was
        cancelled). A cancelled reply ends at once, even if more of it had already arrived.
        An attempt that fails in a way the policy retries is followed by another, whose
        reply is read from its start: what the caller already has is skipped."""
        while True:
            if self._ended:
                return None
            if self.cancelled:
                self._end()
                return None
            # An attempt's time limit runs to its first message only: later, a reply pauses
            # as long as it took to decode while it is written into memory, before its end.
            policy = self.client.retry
            last = self.attempts >= policy.attempts  # it may take all the time left
            limit = None if self._answered or last else policy.attempt_timeout
            try:
                message = await self._receive(limit)
            except grpc.RpcError as rpc_error:
                if self.cancelled:
                    self._end()
                    return None
                error = self._expiry() if self._expired else MemserveError.from_rpc(
                    rpc_error, self.attempts
                )  # fmt: skip
            else:
                if message is not None:
                    self._answered = True
                    piece = self._take(message)
                    if piece is not None or self._ended:
                        return piece
                    continue  # a piece the caller already has
                if self.cancelled:
                    self._end()
                    return None
                if not self._expired:
                    self._end()
                    raise messages.ended_early()
                error = self._expiry()
            await self._retry(error)

    def _expiry(self) -> MemserveError:
        return MemserveError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no answer within {self.client.retry.attempt_timeout:g} s "
            "(RetryPolicy.attempt_timeout)",
            self.attempts,
        )

    def _take(self, message: memserve_pb2.GenerateResponse) -> str | None:
        """What of `message` is new to the caller: a piece of text (None while a retry
        replays what the caller has); None at the final message, which ends the reply."""
        piece = messages.piece_or_done(message)
        if isinstance(piece, GenerateDone):
            if len(self._heard) < len(self._given):
                raise self._diverged(piece)
            self.done = piece
            self._end()
            return None
        if not self._resuming:
            self._heard += piece
            self._given += piece
            return piece
        heard = self._heard = self._heard + piece
        if len(heard) <= len(self._given):
            if not self._given.startswith(heard):
                raise self._diverged(None)
            return None
        if not heard.startswith(self._given):
            raise self._diverged(None)
        fresh = heard[len(self._given) :]
        self._given, self._resuming = heard, False
        return fresh

    def _diverged(self, done: GenerateDone | None) -> MemserveError:
        """The retried reply is not the one the caller was given: stop (the server undoes a
        turn that has not finished), and say so."""
        self._call.cancel()
        self._end()
        if done is None:
            fate = "it was cancelled, so the server undoes the turn"
        else:
            fate = f"the turn finished with the reply {done.text!r}"
        return MemserveError(
            grpc.StatusCode.ABORTED,
            f"attempt {self.attempts} of Generate (request id {self.request_id}) replied "
            f"differently from the text already received ({self._given!r}, then "
            f"{self._heard!r}): {fate}. A retried turn replies the same only with the same "
            "seed and history on a server with the same weights",
            self.attempts,
        )

    async def _retry(self, error: MemserveError) -> None:
        """After the current attempt failed with `error`: wait, then start the next one;
        or raise the error to give up with."""
        if self.client.closed:
            self._end()
            raise error
        try:
            delay = self.client.retry.after_failure("Generate", self.request, error, self._deadline)
        except MemserveError:
            self._end()
            raise
        await self.client._pause(delay or 0.0)
        if not self.cancelled:
            self.attempts += 1
            self._call = self._open()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._on_end is not None:
            self._on_end(self.done)

    def cancel(self) -> None:
        """Stop the reply (from another thread or a signal handler too): the iteration ends
        quietly and `done` stays None. The server stops at its next launch and undoes the
        turn: the session is as it was before the call (step count included)."""
        self.cancelled = True
        self._call.cancel()

    async def _result(self) -> GenerateDone:
        while await self._next_piece() is not None:
            pass
        if self.done is None:
            raise MemserveError(grpc.StatusCode.CANCELLED, "the generation was cancelled")
        return self.done


class StepStreamCore(ABC):
    """Steps of one session over one StepStream call (see `StepStream`); the face exchanges
    the messages."""

    def __init__(
        self, client: ClientCore, session_id: str, session: SessionCore[Any] | None
    ) -> None:
        self.session_id = session_id
        self._session = session
        self.closed = False
        client.streams.add(self)
        if session is not None:
            session.streams.add(self)

    @abstractmethod
    async def _exchange(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        """Send `request`, return its answer; MemserveError if the call ended."""

    @abstractmethod
    def _abort(self) -> None:
        """Cancel the call, without waiting for the server."""

    @abstractmethod
    async def _finish(self) -> None:
        """End the call normally: no more requests, wait for the server to end it."""

    async def _step(self, inputs: Array, expected_step: int | None) -> Stepped[Array]:
        if self.closed:
            raise MemserveError(grpc.StatusCode.FAILED_PRECONDITION, "the stream is closed")
        session = self._session
        if session is not None and expected_step is None:
            expected_step = await session._synced_step(None)
        request = messages.step_request(self.session_id, inputs, expected_step)
        try:
            response = await self._exchange(request)
        except BaseException:  # failed or interrupted: a late reply would answer the next step
            self.cancel()
            if session is not None:
                session.stale = True
            raise
        result = messages.stepped(response, inputs)
        if session is not None:
            session.step_count = result.step
        return result

    def cancel(self) -> None:
        """End the stream at once, without waiting for the server (it sees CANCELLED)."""
        self.closed = True
        self._abort()

    async def _close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._finish()

    async def _exit(self, failed: bool) -> None:
        """The end of a `with` block: closed, or cancelled if the block raised (then
        nothing waits on the server)."""
        if failed:
            self.cancel()
        else:
            await self._close()


class SessionCore(Generic[ClientT]):
    """What `Session` and `AsyncSession` know of their session (see `Session`): its id,
    model and step count, whether that count may be out of date (`stale`: after a call
    that failed or was cancelled, or a reply not read to its end), and its open streams."""

    def __init__(self, client: ClientT, info: SessionInfo) -> None:
        self.client = client
        self.id = info.session_id
        self.model = info.model
        self.step_count = info.step
        self.stale = False
        self.deleted = False
        self.streams: weakref.WeakSet[StepStreamCore] = weakref.WeakSet()  # open ones

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.id!r}, model={self.model!r}, step_count={self.step_count})"

    async def _synced_step(self, timeout: float | None) -> int:
        if self.stale:
            await self._info(timeout)
        return self.step_count

    async def _info(self, timeout: float | None) -> SessionInfo:
        info = await self.client._call(calls.get_session(self.id), timeout)
        self.step_count, self.stale = info.step, False
        return info

    async def _step(self, inputs: Array, timeout: float | None, request_id: str | None) -> Array:
        """The outputs of `inputs`; the step count is the one the server answered, which
        for a retry answered from the server's log is the count after the first attempt."""
        expected = await self._synced_step(timeout)
        call = calls.step(self.id, inputs, expected, request_id)
        try:
            result = await self.client._call(call, timeout)
        except BaseException:  # failed, or interrupted: the steps may have run
            self.stale = True
            raise
        self.step_count = result.step
        return result.outputs

    def _generate_request(
        self, text: str, sampling: Sampling, request_id: str | None
    ) -> memserve_pb2.GenerateRequest:
        self.stale = True  # until the reply's end says where the session is
        return calls.generate(self.id, text, sampling, request_id)

    def _generated(self, done: GenerateDone | None) -> None:
        if done is not None:
            self.step_count, self.stale = done.step, False

    async def _fork(
        self, ttl_seconds: float | None, timeout: float | None, request_id: str | None
    ) -> SessionInfo:
        return await self.client._call(
            calls.fork_session(self.id, ttl_seconds, request_id), timeout
        )

    async def _export(self, timeout: float | None) -> bytes:
        state = await self.client._call(calls.export_session(self.id), timeout)
        self.step_count, self.stale = state.step, False
        return state.state

    async def _delete(self, timeout: float | None) -> None:
        if self.deleted:
            return
        try:
            await self.client._call(calls.delete_session(self.id), timeout)
        except MemserveError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
        self.deleted = True

    async def _exit(self, failed: bool) -> None:
        """The end of the session's `with` block: streams left open end as their own blocks
        would, then the session is deleted; if the block raised, its exception is the one
        to see, not a failed deletion's."""
        for stream in list(self.streams):
            await stream._exit(failed)
        try:
            await self._delete(None)
        except MemserveError:
            if not failed:
                raise

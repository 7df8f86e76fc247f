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
        tried again after UNAVAILABLE as far as `retry` allows; MemserveError if it fails."""
        deadline = Deadline(self._deadline(timeout))
        attempt = 1
        while True:
            try:
                reply = await self._attempt(call.method, call.request, deadline.remaining())
            except grpc.RpcError as rpc_error:
                error = MemserveError.from_rpc(rpc_error, attempt)
            else:
                return call.parse(reply)
            delay = self.retry.after_failure(call.method, call.request, error, deadline)
            if delay is None:  # a retried DeleteSession found its session gone: done
                return call.parse(None)
            await self._pause(delay)
            attempt += 1

    def _generate_call(
        self, session_id: str, text: str, sampling: Sampling, timeout: float | None
    ) -> Any:
        """A Generate call, started; its deadline covers the whole reply."""
        request = messages.generate_request(session_id, text, sampling)
        metadata = with_session(self.metadata, session_id)
        return self.stub.Generate(request, timeout=self._deadline(timeout), metadata=metadata)

    def _cancel_streams(self) -> None:
        """Cancel the step streams still open (before the channel closes)."""
        for stream in list(self.streams):
            stream.cancel()


class GenerationCore(ABC):
    """A reply being generated (see `Generation`); the face reads the call's messages."""

    def __init__(
        self, call: Any, on_end: Callable[[GenerateDone | None], None] | None = None
    ) -> None:
        self._call = call
        self._on_end = on_end
        self._ended = False
        self.done: GenerateDone | None = None
        self.cancelled = False

    @abstractmethod
    async def _receive(self) -> memserve_pb2.GenerateResponse | None:
        """The call's next message; None at its end (or once `cancel` ended it)."""

    async def _next_piece(self) -> str | None:
        """The next piece of text; None when the reply has ended (`done` says how, or it was
        cancelled). A cancelled reply ends at once, even if more of it had already arrived."""
        if self._ended:
            return None
        if self.cancelled:
            self._end()
            return None
        try:
            message = await self._receive()
        except grpc.RpcError as rpc_error:
            self._end()
            if self.cancelled:
                return None
            raise MemserveError.from_rpc(rpc_error) from None
        if message is None:
            self._end()
            if self.cancelled:
                return None
            raise messages.ended_early()
        piece = messages.piece_or_done(message)
        if isinstance(piece, GenerateDone):
            self.done = piece
            self._end()
            return None
        return piece

    def _end(self) -> None:
        self._ended = True
        if self._on_end is not None:
            self._on_end(self.done)

    def cancel(self) -> None:
        """Stop the reply (from another thread or a signal handler too): the iteration ends
        quietly and `done` stays None. The server stops at its next launch and does not
        write the partial reply into the session's memory (the user's text may be, in part
        or whole)."""
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

    async def _step(self, inputs: Array, timeout: float | None) -> Array:
        expected = await self._synced_step(timeout)
        try:
            result = await self.client._call(calls.step(self.id, inputs, expected), timeout)
        except BaseException:  # failed, or interrupted: the steps may have run
            self.stale = True
            raise
        self.step_count = result.step
        return result.outputs

    def _generate_call(self, text: str, sampling: Sampling, timeout: float | None) -> Any:
        call = self.client._generate_call(self.id, text, sampling, timeout)
        self.stale = True  # until the reply's end says where the session is
        return call

    def _generated(self, done: GenerateDone | None) -> None:
        if done is not None:
            self.step_count, self.stale = done.step, False

    async def _fork(self, ttl_seconds: float | None, timeout: float | None) -> SessionInfo:
        return await self.client._call(calls.fork_session(self.id, ttl_seconds), timeout)

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

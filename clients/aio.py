"""The asyncio client: `AsyncClient` is `Client` (clients/client.py) with `await`, on
`grpc.aio`. Same methods, same deadlines, retries and errors; create it inside the event
loop that uses it.

    async with AsyncClient("127.0.0.1:50051") as client:
        async with await client.session("ntm-copy") as session:
            outputs = await session.step(inputs)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from clients import messages
from clients.channel import TLS, ChannelOption, call_metadata, channel_options, resolve_tls
from clients.client import DEFAULT_TIMEOUT, SessionBase
from clients.errors import MemserveError
from clients.messages import Array, GenerateDone, ModelInfo, SessionInfo, SessionState, Stepped
from clients.options import DEFAULT_TARGET
from clients.retry import Deadline, RetryPolicy
from protos import memserve_pb2, memserve_pb2_grpc

ENDING_SECONDS = 1.0  # how long a failed stream call may take to report its status


class AsyncClient:
    """An asyncio connection to a memserve server; the options are `Client`'s."""

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
            self.channel = grpc.aio.insecure_channel(target, options=all_options)
        else:
            self.channel = grpc.aio.secure_channel(target, settings.credentials(), all_options)
        self.stub: Any = memserve_pb2_grpc.MemServeStub(self.channel)  # type: ignore[no-untyped-call]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """`Client._unary` with await."""
        rpc = getattr(self.stub, method)
        deadline = Deadline(self._timeout(timeout))
        attempt = 1
        while True:
            try:
                return await rpc(request, timeout=deadline.remaining(), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = MemserveError.from_rpc(rpc_error, attempt)
            delay = self.retry.after_failure(method, request, error, deadline)
            if delay is None:
                return None
            await asyncio.sleep(delay)
            attempt += 1

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._unary("ListModels", memserve_pb2.ListModelsRequest(), timeout)
        return [messages.model_info(model) for model in reply.models]

    async def create_session(
        self,
        model: str,
        *,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> SessionInfo:
        request = messages.create_request(model, ttl_seconds, seed)
        return messages.session_info(await self._unary("CreateSession", request, timeout))

    async def session(
        self,
        model: str,
        *,
        ttl_seconds: float | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A new session of `model`: `async with await client.session(model) as session`."""
        info = await self.create_session(model, ttl_seconds=ttl_seconds, seed=seed, timeout=timeout)
        return AsyncSession(self, info)

    async def step(
        self,
        session_id: str,
        inputs: Array,
        *,
        expected_step: int | None = None,
        timeout: float | None = None,
    ) -> Stepped[Array]:
        request = messages.step_request(session_id, inputs, expected_step)
        return messages.stepped(await self._unary("Step", request, timeout), inputs)

    def step_stream(self, session_id: str, *, timeout: float | None = None) -> AsyncStepStream:
        return AsyncStepStream(self, session_id, timeout)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        request = memserve_pb2.GetSessionRequest(session_id=session_id)
        return messages.session_info(await self._unary("GetSession", request, timeout))

    async def fork_session(
        self, session_id: str, *, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = memserve_pb2.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return messages.session_info(await self._unary("ForkSession", request, timeout))

    async def export_session(
        self, session_id: str, *, timeout: float | None = None
    ) -> SessionState:
        request = memserve_pb2.ExportSessionRequest(session_id=session_id)
        return messages.session_state(await self._unary("ExportSession", request, timeout))

    async def import_session(
        self, state: bytes, *, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = memserve_pb2.ImportSessionRequest(state=state, ttl_seconds=ttl_seconds)
        return messages.session_info(await self._unary("ImportSession", request, timeout))

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        request = memserve_pb2.DeleteSessionRequest(session_id=session_id)
        await self._unary("DeleteSession", request, timeout)

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
    ) -> AsyncGeneration:
        """The reply to `text`: `async for piece in client.generate(...)`."""
        request = messages.generate_request(
            session_id, text, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop,
        )  # fmt: skip
        return AsyncGeneration(self._generate_call(request, timeout))

    def _generate_call(self, request: memserve_pb2.GenerateRequest, timeout: float | None) -> Any:
        return self.stub.Generate(request, timeout=self._timeout(timeout), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncGeneration:
    """`Generation` for asyncio: `async for piece in generation`, then `done`."""

    def __init__(
        self, call: Any, on_end: Callable[[GenerateDone | None], None] | None = None
    ) -> None:
        self._call = call
        self._on_end = on_end
        self._ended = False
        self.done: GenerateDone | None = None
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as rpc_error:
            self._end()
            if self.cancelled:
                raise StopAsyncIteration from None
            raise MemserveError.from_rpc(rpc_error) from None
        except asyncio.CancelledError:
            if not self.cancelled:
                raise  # the task itself is cancelled
            self._end()  # grpc.aio answers a read after cancel() with CancelledError
            raise StopAsyncIteration from None
        if message is grpc.aio.EOF:
            self._end()
            if self.cancelled:
                raise StopAsyncIteration
            raise messages.ended_early()
        piece = messages.piece_or_done(message)
        if isinstance(piece, GenerateDone):
            self.done = piece
            self._end()
            raise StopAsyncIteration
        return piece

    def _end(self) -> None:
        self._ended = True
        if self._on_end is not None:
            self._on_end(self.done)

    def cancel(self) -> None:
        """Stop the reply (see `Generation.cancel`); the iteration then ends quietly."""
        self.cancelled = True
        self._call.cancel()

    async def result(self) -> GenerateDone:
        async for _ in self:
            pass
        if self.done is None:
            raise MemserveError(grpc.StatusCode.CANCELLED, "the generation was cancelled")
        return self.done


class AsyncStepStream:
    """`StepStream` for asyncio: `await stream.step(inputs)`; `await stream.close()`."""

    def __init__(
        self,
        client: AsyncClient,
        session_id: str,
        timeout: float | None,
        session: AsyncSession | None = None,
    ) -> None:
        self.session_id = session_id
        self._session = session
        self._call: Any = client.stub.StepStream(timeout=timeout, metadata=client.metadata)
        self.closed = False

    async def step(self, inputs: Array, *, expected_step: int | None = None) -> Stepped[Array]:
        if self.closed:
            raise MemserveError(grpc.StatusCode.FAILED_PRECONDITION, "the stream is closed")
        if self._session is not None and expected_step is None:
            expected_step = await self._session.synced_step()
        if self._call.done():  # ended between steps: its deadline passed, or it was cancelled
            self._fail()
            raise MemserveError(await self._call.code(), await self._call.details())
        try:
            await self._call.write(messages.step_request(self.session_id, inputs, expected_step))
            response = await self._call.read()
        except grpc.RpcError as rpc_error:
            error = await self._ended() or MemserveError.from_rpc(rpc_error)
            self._fail()
            raise error from None
        except BaseException:  # the task was cancelled: its reply would answer the next step
            self._fail()
            raise
        if response is grpc.aio.EOF:
            ended = await self._ended()
            self._fail()
            raise ended or MemserveError(grpc.StatusCode.INTERNAL, "the stream ended early")
        result = messages.stepped(response, inputs)
        if self._session is not None:
            self._session.step_count = result.step
        return result

    async def _ended(self) -> MemserveError | None:
        """The call's own status, once a write or read on it failed: a write that races the
        call's end (its deadline, the server's answer) fails with a bare INTERNAL that hides
        it. A failed write or read means the call is ending; the wait is bounded anyway."""
        try:
            code = await asyncio.wait_for(self._call.code(), ENDING_SECONDS)
        except asyncio.TimeoutError:
            return None
        if code == grpc.StatusCode.OK:
            return None
        return MemserveError(code, await self._call.details())

    def _fail(self) -> None:
        """The stream is over (cancelled if it was not yet), the session's count unknown."""
        self.closed = True
        self._call.cancel()
        if self._session is not None:
            self._session.stale = True

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._call.done():
            return  # it ended already (its deadline, a cancel): nothing to finish
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            pass  # it ended anyway

    async def __aenter__(self) -> AsyncStepStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSession(SessionBase):
    """`Session` for asyncio: `async with await client.session(model) as session`."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        super().__init__(info)
        self.client = client

    async def synced_step(self, timeout: float | None = None) -> int:
        if self.stale:
            await self.info(timeout=timeout)
        return self.step_count

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        info = await self.client.get_session(self.id, timeout=timeout)
        self.step_count, self.stale = info.step, False
        return info

    async def step(self, inputs: Array, *, timeout: float | None = None) -> Array:
        expected = await self.synced_step(timeout)
        try:
            result = await self.client.step(
                self.id, inputs, expected_step=expected, timeout=timeout
            )
        except BaseException:  # failed, or cancelled: the steps may have run
            self.stale = True
            raise
        self.step_count = result.step
        return result.outputs

    def step_stream(self, *, timeout: float | None = None) -> AsyncStepStream:
        return AsyncStepStream(self.client, self.id, timeout, session=self)

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
    ) -> AsyncGeneration:
        request = messages.generate_request(
            self.id, text, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop,
        )  # fmt: skip
        call = self.client._generate_call(request, timeout)
        self.stale = True
        return AsyncGeneration(call, on_end=self._generated)

    async def fork(
        self, *, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> AsyncSession:
        info = await self.client.fork_session(self.id, ttl_seconds=ttl_seconds, timeout=timeout)
        return AsyncSession(self.client, info)

    async def export(self, *, timeout: float | None = None) -> bytes:
        state = await self.client.export_session(self.id, timeout=timeout)
        self.step_count, self.stale = state.step, False
        return state.state

    async def delete(self, *, timeout: float | None = None) -> None:
        if self.deleted:
            return
        try:
            await self.client.delete_session(self.id, timeout=timeout)
        except MemserveError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
        self.deleted = True

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self.delete()
        except MemserveError:
            if kind is None:
                raise

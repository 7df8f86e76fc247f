"""The asyncio client: `AsyncClient` is `Client` (clients/client.py) with `await`, on
`grpc.aio`. Same methods, same deadlines, request ids, retries and errors, the same session
bookkeeping (both faces run `clients/core.py`); create it inside the event loop that uses it.

    async with AsyncClient("127.0.0.1:50051") as client:
        async with await client.session("ntm-copy") as session:
            outputs = await session.step(inputs)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from clients import calls
from clients.channel import with_session
from clients.core import ClientCore, GenerationCore, SessionCore, StepStreamCore
from clients.errors import MemserveError
from clients.messages import Array, GenerateDone, ModelInfo, SessionInfo, SessionState, Stepped
from protos import memserve_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from clients.messages import Sampling

Seconds = float | None
ENDING_SECONDS = 1.0  # how long a failed stream call may take to report its status


class AsyncClient(ClientCore):
    """An asyncio connection to a memserve server; the options and methods are `Client`'s."""

    grpc_module = grpc.aio

    async def _attempt(self, method: str, request: Any, timeout: Seconds) -> Any:
        metadata = with_session(self.metadata, request)
        return await getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def list_models(self, *, timeout: Seconds = None) -> list[ModelInfo]:
        return await self._call(calls.list_models(), timeout)

    async def create_session(
        self, model: str, *, ttl_seconds: Seconds = None, seed: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        call = calls.create_session(model, ttl_seconds, seed, request_id)
        return await self._call(call, timeout)

    async def session(
        self, model: str, *, ttl_seconds: Seconds = None, seed: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> AsyncSession:  # fmt: skip
        """A new session of `model`: `async with await client.session(model) as session`."""
        info = await self.create_session(
            model, ttl_seconds=ttl_seconds, seed=seed, timeout=timeout, request_id=request_id
        )
        return AsyncSession(self, info)

    async def step(
        self, session_id: str, inputs: Array, *, expected_step: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> Stepped[Array]:  # fmt: skip
        call = calls.step(session_id, inputs, expected_step, request_id)
        return await self._call(call, timeout)

    def step_stream(self, session_id: str, *, timeout: Seconds = None) -> AsyncStepStream:
        return AsyncStepStream(self, session_id, timeout)

    async def get_session(self, session_id: str, *, timeout: Seconds = None) -> SessionInfo:
        return await self._call(calls.get_session(session_id), timeout)

    async def fork_session(
        self, session_id: str, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        return await self._call(calls.fork_session(session_id, ttl_seconds, request_id), timeout)

    async def export_session(self, session_id: str, *, timeout: Seconds = None) -> SessionState:
        return await self._call(calls.export_session(session_id), timeout)

    async def import_session(
        self, state: bytes, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        return await self._call(calls.import_session(state, ttl_seconds, request_id), timeout)

    async def delete_session(self, session_id: str, *, timeout: Seconds = None) -> None:
        await self._call(calls.delete_session(session_id), timeout)

    def generate(
        self, session_id: str, text: str, *, timeout: Seconds = None,
        request_id: str | None = None, **sampling: Unpack[Sampling],
    ) -> AsyncGeneration:  # fmt: skip
        """The reply to `text`: `async for piece in client.generate(...)`."""
        request = calls.generate(session_id, text, sampling, request_id)
        return AsyncGeneration(self, request, timeout)

    async def close(self) -> None:
        """Cancel the step streams still open, then close the channel."""
        self._cancel_streams()
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *details: object) -> None:
        await self.close()


class AsyncGeneration(GenerationCore):
    """`Generation` for asyncio: `async for piece in generation`, then `done`."""

    async def _receive(self, limit: Seconds) -> memserve_pb2.GenerateResponse | None:
        call = self._call
        timer = None
        if limit is not None:
            timer = asyncio.get_running_loop().call_later(limit, self._expire, call)
        try:
            message = await call.read()
        except asyncio.CancelledError:
            if not (self.cancelled or self._expired):
                raise  # the task itself is cancelled
            return None  # grpc.aio answers a read after cancel() with CancelledError
        finally:
            if timer is not None:
                timer.cancel()
        return None if message is grpc.aio.EOF else message

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def result(self) -> GenerateDone:
        return await self._result()


class AsyncStepStream(StepStreamCore):
    """`StepStream` for asyncio: `await stream.step(inputs)`; `await stream.close()`."""

    def __init__(
        self,
        client: AsyncClient,
        session_id: str,
        timeout: Seconds,
        session: AsyncSession | None = None,
    ) -> None:
        super().__init__(client, session_id, session)
        self._call: Any = client.stub.StepStream(
            timeout=timeout, metadata=with_session(client.metadata, session_id)
        )

    async def _exchange(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        if self._call.done():  # ended between steps: its deadline passed, or it was cancelled
            raise MemserveError(await self._call.code(), await self._call.details())
        try:
            await self._call.write(request)
            response = await self._call.read()
        except grpc.RpcError as rpc_error:
            raise (await self._ended() or MemserveError.from_rpc(rpc_error)) from None
        if response is grpc.aio.EOF:
            ended = await self._ended()
            raise ended or MemserveError(grpc.StatusCode.INTERNAL, "the stream ended early")
        message: memserve_pb2.StepResponse = response
        return message

    async def _ended(self) -> MemserveError | None:
        """The call's own status, once a write or read on it failed: a write that races the
        call's end (its deadline, the server's answer) fails with a bare INTERNAL that hides
        it. A failed write or read means the call is ending; the wait is bounded anyway.
        (When grpc.aio handles the failed write after the server's status, it overwrites
        that status with its INTERNAL for good, grpc/grpc#36066: then INTERNAL it is.)"""
        try:
            code = await asyncio.wait_for(self._call.code(), ENDING_SECONDS)
        except asyncio.TimeoutError:
            return None
        if code == grpc.StatusCode.OK:
            return None
        return MemserveError(code, await self._call.details())

    def _abort(self) -> None:
        self._call.cancel()

    async def _finish(self) -> None:
        if self._call.done():
            return  # it ended already (its deadline, a cancel): nothing to finish
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            pass  # it ended anyway

    async def step(self, inputs: Array, *, expected_step: int | None = None) -> Stepped[Array]:
        return await self._step(inputs, expected_step)

    async def close(self) -> None:
        await self._close()

    async def __aenter__(self) -> AsyncStepStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *details: object) -> None:
        await self._exit(kind is not None)


class AsyncSession(SessionCore[AsyncClient]):
    """`Session` for asyncio: `async with await client.session(model) as session`."""

    async def synced_step(self, timeout: Seconds = None) -> int:
        return await self._synced_step(timeout)

    async def info(self, *, timeout: Seconds = None) -> SessionInfo:
        return await self._info(timeout)

    async def step(
        self, inputs: Array, *, timeout: Seconds = None, request_id: str | None = None
    ) -> Array:
        return await self._step(inputs, timeout, request_id)

    def step_stream(self, *, timeout: Seconds = None) -> AsyncStepStream:
        return AsyncStepStream(self.client, self.id, timeout, session=self)

    def generate(
        self, text: str, *, timeout: Seconds = None, request_id: str | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncGeneration:  # fmt: skip
        request = self._generate_request(text, sampling, request_id)
        return AsyncGeneration(self.client, request, timeout, on_end=self._generated)

    async def fork(
        self, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> AsyncSession:  # fmt: skip
        return AsyncSession(self.client, await self._fork(ttl_seconds, timeout, request_id))

    async def export(self, *, timeout: Seconds = None) -> bytes:
        return await self._export(timeout)

    async def delete(self, *, timeout: Seconds = None) -> None:
        await self._delete(timeout)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *details: object) -> None:
        await self._exit(kind is not None)

"""One ModelStreamInfer stream's requests, answered as Triton answers them: each request as
soon as it is done, concurrently, but those of one sequence one at a time in the order they
came (a request waits for its sequence's previous one).

A stream that has carried one sequence so far is answered inline, request after request,
as memserve.v1's StepStream is (no task per request: a client with one stream per sequence
pays what a v1 client pays). The first request of another sequence turns the stream
concurrent for good: from then on each request is a task, and the responses go out through
a queue in the order they are ready. A request's error is its own message
(`MessageContext`), the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import grpc

from serving.kserve_wire import order_key


class MessageFailedError(Exception):
    """One stream message's error, as its `error_message` (the stream goes on)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"[{code}] {details}")  # as tritonclient shows a unary call's error


class MessageContext:
    """What `rpc.Answering` sees of one stream message: the stream's metadata (its key), and
    an abort that fails the message, not the stream (a message has no trailing metadata of
    its own, so a pushback is dropped)."""

    def __init__(self, stream: grpc.aio.ServicerContext) -> None:
        self.stream = stream

    def invocation_metadata(self) -> Any:
        return self.stream.invocation_metadata()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise MessageFailedError(code, details)


# One request -> its one message, or an async generator of its messages (a dialogue turn).
Answer = Callable[[Any], Awaitable[Any]]


async def messages_of(answer: Any) -> AsyncGenerator[Any, None]:
    async with contextlib.aclosing(answer) as messages:
        async for message in messages:
            yield message


async def answer_stream(requests: AsyncIterator[Any], answer: Answer) -> AsyncGenerator[Any, None]:
    """Every message of every request on the stream, in the order they are ready."""
    requests = aiter(requests)
    only: Hashable | None = None
    async for request in requests:
        key = order_key(request)
        only = key if only is None else only
        if key is None or key != only:
            async with contextlib.aclosing(concurrently(request, requests, answer)) as messages:
                async for message in messages:
                    yield message
            return
        answered = await answer(request)
        if isinstance(answered, AsyncGenerator):
            async for message in messages_of(answered):
                yield message
        else:
            yield answered


async def concurrently(
    first: Any, requests: AsyncIterator[Any], answer: Answer
) -> AsyncGenerator[Any, None]:
    """`first`, then the rest of `requests`, each in a task after its sequence's previous."""
    ready: asyncio.Queue[Any] = asyncio.Queue()
    tails: dict[Hashable, asyncio.Task[None]] = {}  # each sequence's latest request
    tasks: set[asyncio.Task[None]] = set()

    async def run(request: Any, after: asyncio.Task[None] | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait((after,))
        answered = await answer(request)
        if isinstance(answered, AsyncGenerator):
            async for message in messages_of(answered):
                ready.put_nowait(message)
        else:
            ready.put_nowait(answered)

    def start(request: Any) -> None:
        key = order_key(request)
        task = asyncio.create_task(run(request, tails.get(key)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if key is not None:
            tails[key] = task
            task.add_done_callback(functools.partial(forget, key))

    def forget(key: Hashable, done: asyncio.Task[None]) -> None:
        if tails.get(key) is done:
            del tails[key]

    async def read() -> None:
        start(first)
        async for request in requests:
            start(request)
        if tasks:
            await asyncio.wait(tasks)
        ready.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (message := await ready.get()) is not None:
            yield message
        await reader
    finally:
        for task in (reader, *tasks):
            task.cancel()

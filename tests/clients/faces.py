"""Both faces of the client library behind one interface, the asyncio one, so that each client
test is written once and runs once per face (the `face` fixture).

The asyncio face is used as it is. A blocking object is wrapped in `Blocking`, which has its
asyncio twin's API: a method that is a coroutine on the twin is a coroutine here too, one
that makes the blocking call at once and never suspends; so a test body run with
`core.finish` (no event loop) makes every blocking call in this thread, where Ctrl-C can
reach it. Test bodies therefore await only the library and `Face`'s helpers, never asyncio
directly.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import pytest

from clients import (
    AsyncClient,
    AsyncGeneration,
    AsyncSession,
    AsyncStepStream,
    Client,
    Generation,
    Session,
    StepStream,
)
from clients.core import finish
from clients.messages import SessionInfo
from tests.clients.fake_server import Hold

TWINS: dict[type, type] = {
    Client: AsyncClient,
    Session: AsyncSession,
    StepStream: AsyncStepStream,
    Generation: AsyncGeneration,
}
END = object()
T = TypeVar("T")


def wrapped(value: Any) -> Any:
    """`value`, wrapped if it is an object of the blocking face."""
    return Blocking(value) if type(value) in TWINS else value


class Blocking:
    """A blocking library object with its asyncio twin's API (see the module's docstring)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value
        if inspect.iscoroutinefunction(getattr(TWINS[type(self._inner)], name, None)):

            async def blocking_call(*args: Any, **kwargs: Any) -> Any:
                return wrapped(value(*args, **kwargs))

            return blocking_call
        return lambda *args, **kwargs: wrapped(value(*args, **kwargs))

    async def __aenter__(self) -> Any:
        return wrapped(self._inner.__enter__())

    async def __aexit__(self, *details: Any) -> None:
        self._inner.__exit__(*details)

    def __aiter__(self) -> Blocking:
        return self

    async def __anext__(self) -> Any:
        item = next(self._inner, END)
        if item is END:
            raise StopAsyncIteration
        return item


def inner(value: Any) -> Any:
    """The library's own object behind a face's object."""
    return value._inner if isinstance(value, Blocking) else value


@dataclass(frozen=True)
class Face:
    """One face of the library: "blocking" or "asyncio"."""

    name: str

    def client(self, target: str, **options: Any) -> AsyncClient:
        """A client of this face (an asyncio one: create it in `run`'s body)."""
        if self.name == "asyncio":
            return AsyncClient(target, **options)
        return cast(AsyncClient, Blocking(Client(target, **options)))

    def session(self, client: AsyncClient, info: SessionInfo) -> AsyncSession:
        """`Session(client, info)` of this face."""
        if self.name == "asyncio":
            return AsyncSession(client, info)
        return cast(AsyncSession, Blocking(Session(inner(client), info)))

    def run(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run a test body: in an event loop, or (blocking) straight in this thread."""
        if self.name == "asyncio":

            async def main() -> None:
                await body()

            asyncio.run(main())
        else:
            finish(cast(Any, body()))

    async def interrupt(self, start: Callable[[], Awaitable[Any]], hold: Hold) -> None:
        """Start a call and interrupt it once `hold` has it on the server: Ctrl-C in the
        blocking face, a cancelled task in the asyncio one. Either way it raises, which
        this checks; the hold is then released."""
        if self.name == "asyncio":
            task = asyncio.ensure_future(start())
            await asyncio.to_thread(hold.wait_entered)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:

            def ctrl_c() -> None:
                hold.wait_entered()
                _thread.interrupt_main()

            interrupter = threading.Thread(target=ctrl_c, daemon=True)
            interrupter.start()
            with pytest.raises(KeyboardInterrupt):
                await start()
            interrupter.join()
        hold.release.set()

    def begin(self, start: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """Start a call and go on while it runs (a task in the asyncio face, a thread in
        the blocking one); returns what waits for its result."""
        if self.name == "asyncio":
            task = asyncio.ensure_future(start())

            async def task_result() -> T:
                return await task

            return task_result
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(finish(cast(Any, start())))
            except BaseException as error:  # handed to the waiter, Ctrl-C included
                future.set_exception(error)

        threading.Thread(target=run, daemon=True).start()

        async def thread_result() -> T:
            return future.result(timeout=600)

        return thread_result

    async def aside(self, work: Callable[[], T]) -> T:
        """`work()`, which blocks, without blocking the asyncio face's event loop (the calls
        it has begun go on meanwhile)."""
        if self.name == "asyncio":
            return await asyncio.to_thread(work)
        return work()

    async def status(self, stream: AsyncStepStream) -> grpc.StatusCode:
        """How the StepStream call under a stream ended (it must have ended)."""
        call = inner(stream)._call
        if self.name == "asyncio":
            code: grpc.StatusCode = await call.code()
            return code
        return cast(grpc.StatusCode, call.code())


FACES = ("blocking", "asyncio")

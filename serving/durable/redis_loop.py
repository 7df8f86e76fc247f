"""A Redis connection the event loop drives itself, for the store's commits.

`--durability launch` holds a launch's calls until their commit is written, and at T = 1
how that wait reaches the event loop is what costs: a commit made in the committer's thread
must win the GIL back from the busy loop to run and again to hand its answer over, while a
round trip the loop waits on like any socket costs two system calls. redis-py's asyncio
client would avoid the thread, but its own Python on the loop costs as much as the hop
(docs/performance.md, "What limits T = 1" and "Redis's commit on the event loop"). So the
commit's one round trip goes through this: an asyncio protocol whose commands are packed
and replies parsed by hiredis (redis-py's own C parser), nothing else. Everything else the
store does (loads, claims, probes) stays on redis-py in the committer's thread.

Replies come back in the order commands were sent; a connection lost or a reply not back
within the timeout fails every command waiting on it, and the connection is dropped at
once, with whatever it had not sent yet (the next commit opens another, once the
committer's probe, made on such a connection too, finds Redis again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis

from serving.durable.base import StoreUnavailable


class RedisLoopConnection(asyncio.Protocol):
    """One connection to Redis, its commands sent and answered on the event loop."""

    def __init__(self, where: str) -> None:
        self.where = where  # for errors: the store's URL
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: StoreUnavailable | None = None

    @classmethod
    async def open(
        cls, where: str, settings: dict[str, Any], timeout: float
    ) -> RedisLoopConnection:
        """Connect as redis-py's `settings` (its connection pool's keyword arguments) say:
        a Unix socket `path` or a `host` and `port`, then AUTH and SELECT where they ask."""
        loop = asyncio.get_running_loop()
        if settings.get("path"):
            connecting = loop.create_unix_connection(lambda: cls(where), settings["path"])
        else:
            host, port = settings.get("host", "localhost"), settings.get("port", 6379)
            connecting = loop.create_connection(lambda: cls(where), host, port)
        try:
            _, connection = await asyncio.wait_for(connecting, timeout)
        except (OSError, asyncio.TimeoutError) as error:
            why = str(error) or f"no connection within {timeout:g} s"
            raise StoreUnavailable(f"the session store {where} cannot be reached: {why}") from error
        try:
            if settings.get("password") is not None:
                user = [settings["username"]] if settings.get("username") else []
                await connection.checked(timeout, "AUTH", *user, settings["password"])
            if settings.get("db"):
                await connection.checked(timeout, "SELECT", settings["db"])
        except BaseException:
            connection.close()
            raise
        return connection

    async def checked(self, timeout: float, *arguments: Any) -> Any:
        """`command`, with an error reply raised as StoreUnavailable."""
        reply = await self.command(timeout, *arguments)
        if isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailable.unusable(self.where, reply)
        return reply

    async def command(self, timeout: float, *arguments: Any) -> Any:
        """Send one command and wait for its reply (a Redis error reply comes back as a
        `hiredis.ReplyError`, not raised). StoreUnavailable if the connection is lost or
        the reply takes longer than `timeout`: the command may still run in Redis, as a
        write whose reply a network error lost may."""
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(reply)
        self.transport.write(hiredis.pack_command(arguments))
        late = loop.call_later(timeout, self._fail, f"no reply within {timeout:g} s")
        try:
            return await reply
        finally:
            late.cancel()

    def close(self) -> None:
        self._fail("closed")

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # nothing asked for it: the stream is not what we think
                self._fail(f"a reply nothing waited for ({reply!r})")
                return
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, error: Exception | None) -> None:
        self._fail(f"the connection closed ({error})" if error else "the connection closed")

    def _fail(self, why: str) -> None:
        if self.lost is None:
            self.lost = StoreUnavailable.unusable(self.where, why)
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)
        if self.transport is not None:
            # abort, not close: close would go on sending what is buffered, and a commit
            # reported failed would land later, after the ones that follow it
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                self.transport.abort()

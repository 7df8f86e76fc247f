"""Exactly-once calls: what a request id already answered, per session.

A call that names a request id is looked up first. A repeat of a finished call gets its
answer again and runs nothing; a repeat while the first still runs waits for it and gets
its answer; the same id with other contents is INVALID_ARGUMENT. A call that failed leaves
no trace, so its retry runs. The answers are committed with the call's steps
(`serving.journal`), so a retry after a restart still finds them.

The bound: the answers of a session's last `keep` calls with request ids. A client that
retries a call before it has sent `keep` newer ones on the same session always gets its
answer; memserve's clients send one call at a time per session and retry only the last.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from protos import journal_pb2, tensors
from serving.durable.base import RESPONSES_KEPT
from serving.errors import FailedPrecondition, InvalidArgument, Unavailable

MAX_REQUEST_ID = 128


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_Made = TypeVar("_Made", bound=_HasId)


def scoped(tenant: str, request_id: str) -> str:
    """A request id as one tenant's: two tenants' same id are two requests."""
    return f"{tenant}\x00{request_id}"


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID}"
        )


@dataclass
class Remembered:
    """One request id: what its call asked (`digest`) and, once done, what it answered."""

    digest: bytes
    response: journal_pb2.Response | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None  # the first call failed: its waiters fail the same way


class RequestLog:
    """A session's recent request ids, oldest first."""

    def __init__(self, keep: int = RESPONSES_KEPT) -> None:
        self.keep = keep
        self.entries: OrderedDict[str, Remembered] = OrderedDict()
        self.answers = 0  # entries with a response

    def find(self, request_id: str, digest: bytes) -> Remembered | None:
        """The earlier call with this id, if any; INVALID_ARGUMENT if it asked otherwise."""
        found = self.entries.get(request_id)
        if found is not None and found.digest != digest:
            raise InvalidArgument(
                f"request_id {request_id!r} was used before for a different request; "
                "a retry must repeat the request exactly, a new request needs a new id"
            )
        return found

    async def earlier(self, request_id: str, digest: bytes) -> journal_pb2.Response | None:
        """The answer of an earlier call with this id (waiting for it if it still runs), or
        None after noting that this call starts under the id."""
        found = self.find(request_id, digest)
        if found is None:
            self.begin(request_id, digest)
            return None
        await found.done.wait()
        if found.error is not None:
            raise found.error
        assert found.response is not None
        return found.response

    def begin(self, request_id: str, digest: bytes) -> Remembered:
        """A call with this id starts (the caller checked `find` first)."""
        entry = Remembered(digest)
        self.entries[request_id] = entry
        return entry

    def finish(self, request_id: str, response: journal_pb2.Response) -> None:
        """The call answered: remember it, and let repeats waiting for it have it."""
        entry = self.entries.get(request_id)
        if entry is None:
            return
        self.answers += entry.response is None
        entry.response = response
        entry.done.set()
        self._trim()

    def fail(self, request_id: str, error: Exception) -> None:
        """The call failed: its waiters fail too, and the id is forgotten so a retry runs."""
        entry = self.entries.pop(request_id, None)
        if entry is not None:
            self.answers -= entry.response is not None
            entry.error = error
            entry.done.set()

    def load(self, responses: Iterable[journal_pb2.Response]) -> None:
        """Answers brought back from the store, oldest first."""
        for response in responses:
            entry = Remembered(response.request_digest, response)
            entry.done.set()
            replaced = self.entries.pop(response.request_id, None)
            self.answers -= replaced is not None and replaced.response is not None
            self.entries[response.request_id] = entry
            self.answers += 1
        self._trim()

    def answered(self) -> list[journal_pb2.Response]:
        """The remembered answers, oldest first (what a snapshot carries forward)."""
        return [e.response for e in self.entries.values() if e.response is not None]

    def _trim(self) -> None:
        """Forget the oldest answers beyond `keep` (a call still running stays); on every
        answer, so this finds the one to drop among the first few entries."""
        while self.answers > self.keep:
            oldest = next(key for key, entry in self.entries.items() if entry.response is not None)
            del self.entries[oldest]
            self.answers -= 1


def answered_step(answer: journal_pb2.Response, step: int) -> tuple[np.ndarray, int]:
    """The outputs and step count a Step call with this request id answered (`step`: the
    session's step count now, for the error when the id answered something else)."""
    if answer.HasField("step"):
        return tensors.decode(answer.step.outputs, "outputs"), answer.step.step
    raise FailedPrecondition(
        f"request {answer.request_id!r} was {answer.cancelled or 'not a Step call'}; "
        f"the session is at step {step}"
    )


def reply_seed(seed: int | None, session_seed: int | None, request_id: str) -> int | None:
    """What a turn's randomness starts from: the request's seed, else the session's, else
    one derived from the request id, so that a retry of the turn gives the same reply
    (None: fresh entropy)."""
    if seed is not None:
        return seed
    if session_seed is not None:
        return session_seed
    if request_id:
        return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")
    return None


@dataclass
class Made:
    """A CreateSession, ForkSession or ImportSession request id, and the session it made."""

    digest: bytes
    made: float  # time.time() when it was made
    session_id: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None


class RecentSessions:
    """The request ids of the sessions one model made lately, for retries of their calls:
    each kept `keep_seconds` (and no more than `keep` of them), the oldest dropped first.
    Ids come in time order from this server's calls but in any order from a store (a
    restart, a replica taking sessions over), so their age order is a heap."""

    def __init__(self, keep_seconds: float = 600.0, keep: int = 65536) -> None:
        self.keep_seconds = keep_seconds
        self.keep = keep
        self.entries: dict[str, Made] = {}
        # (made, tie-break, id, entry), the oldest on top; an item whose entry is no longer
        # the id's (it failed, or was made again) is dropped when it comes up.
        self.by_age: list[tuple[float, int, str, Made]] = []
        self.counter = itertools.count()

    def find(self, request_id: str, digest: bytes, now: float) -> Made | None:
        self._trim(now)
        found = self.entries.get(request_id)
        if found is not None and found.digest != digest:
            raise InvalidArgument(
                f"request_id {request_id!r} was used before for a different request; "
                "a retry must repeat the request exactly, a new request needs a new id"
            )
        return found

    def begin(self, request_id: str, digest: bytes, now: float) -> Made:
        return self._keep(request_id, Made(digest, now))

    def _keep(self, request_id: str, entry: Made) -> Made:
        self.entries[request_id] = entry
        heapq.heappush(self.by_age, (entry.made, next(self.counter), request_id, entry))
        return entry

    def finish(self, request_id: str, session_id: str) -> None:
        entry = self.entries.get(request_id)
        if entry is not None:
            entry.session_id = session_id
            entry.done.set()

    def fail(self, request_id: str, error: Exception) -> None:
        entry = self.entries.pop(request_id, None)
        if entry is not None:
            entry.error = error
            entry.done.set()

    async def once(
        self,
        request_id: str,
        digest: bytes,
        make: Callable[[], Awaitable[_Made]],
        earlier: Callable[[str], _Made],
    ) -> _Made:
        """`make()` a session, or, for a repeat of `request_id`, `earlier(session id)` of the
        session the first call made (waiting for it if it is still being made). Whatever
        happens to `make`, the id is settled: its repeats get the session, or the error to
        retry after."""
        now = time.time()
        found = self.find(request_id, digest, now)
        if found is not None:
            await found.done.wait()
            if found.error is not None:
                raise found.error
            return earlier(found.session_id)
        self.begin(request_id, digest, now)
        try:
            made = await make()
        except BaseException as error:
            if not isinstance(error, Exception):  # cancelled: its repeat should run
                error = Unavailable("the first call with this request id was cut short; retry")
            self.fail(request_id, error)
            raise
        self.finish(request_id, made.id)
        return made

    def load(self, request_id: str, digest: bytes, session_id: str, made: float) -> None:
        """Keep the id of a session made at `made` (wall-clock seconds) by an earlier server."""
        entry = Made(digest, made, session_id)
        entry.done.set()
        self._keep(request_id, entry)

    def _trim(self, now: float) -> None:
        while self.by_age:
            made, _, key, oldest = self.by_age[0]
            if self.entries.get(key) is not oldest:
                heapq.heappop(self.by_age)  # settled otherwise since
                continue
            if len(self.entries) <= self.keep and now - made <= self.keep_seconds:
                break
            if not oldest.done.is_set():
                break  # still running: its waiters need it
            heapq.heappop(self.by_age)
            del self.entries[key]

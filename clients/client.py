"""The blocking client: `Client` has one method per RPC of memserve.v1.MemServe, and
`client.session(model)` gives a `Session` that tracks its step count and is deleted when its
`with` block ends. `clients/aio.py` is the same for asyncio.

Every call has a deadline (the client's `timeout`, or the call's own), is retried on
UNAVAILABLE or an attempt's DEADLINE_EXCEEDED when it is safe to repeat (`clients/retry.py`:
the calls that change something carry a request id, so the server runs them once), and
fails with `MemserveError`.
What it does is `clients/core.py`, shared with the asyncio face; this module only waits:
its I/O blocks, so each of the core's coroutines runs to its end at once (`finish`).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from clients import calls
from clients.channel import with_session
from clients.core import ClientCore, GenerationCore, SessionCore, StepStreamCore, finish
from clients.errors import MemserveError
from clients.messages import Array, GenerateDone, ModelInfo, SessionInfo, SessionState, Stepped
from protos import memserve_pb2

if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Unpack

    from clients.messages import Sampling

Seconds = float | None


class Client(ClientCore):
    """A blocking connection to a memserve server.

    `timeout`: seconds each call may take (its attempts and backoff together), unless the
    call passes its own; None: no deadline. `tls`: True (default roots) or `TLS(...)`;
    `token`: sent as `authorization: Bearer <token>` with every call. `retry`: see
    `RetryPolicy`. `options`: extra gRPC channel options. Thread-safe; close it (or use
    `with`) when done.
    """

    grpc_module = grpc

    @functools.cached_property
    def _watchdog(self) -> Watchdog:
        """What times the reads of this client's replies (see `RetryPolicy.attempt_timeout`)."""
        return Watchdog()

    async def _attempt(self, method: str, request: Any, timeout: Seconds) -> Any:
        metadata = with_session(self.metadata, request)
        return getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)

    async def _pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def list_models(self, *, timeout: Seconds = None) -> list[ModelInfo]:
        return finish(self._call(calls.list_models(), timeout))

    def create_session(
        self, model: str, *, ttl_seconds: Seconds = None, seed: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        """A new session. `request_id` names the call (default: a fresh random one), so
        that its retries make one session; the same below for step, fork_session,
        import_session and generate."""
        call = calls.create_session(model, ttl_seconds, seed, request_id)
        return finish(self._call(call, timeout))

    def session(
        self, model: str, *, ttl_seconds: Seconds = None, seed: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> Session:  # fmt: skip
        """A new session of `model`, deleted when its `with` block ends."""
        info = self.create_session(
            model, ttl_seconds=ttl_seconds, seed=seed, timeout=timeout, request_id=request_id
        )
        return Session(self, info)

    def step(
        self, session_id: str, inputs: Array, *, expected_step: int | None = None,
        timeout: Seconds = None, request_id: str | None = None,
    ) -> Stepped[Array]:  # fmt: skip
        """Run `inputs` `[T, input_size]` through the session: T steps in order, once, even
        when the call is retried (its request id). With `expected_step` the server refuses
        (FAILED_PRECONDITION) unless the session is at that step count."""
        call = calls.step(session_id, inputs, expected_step, request_id)
        return finish(self._call(call, timeout))

    def step_stream(self, session_id: str, *, timeout: Seconds = None) -> StepStream:
        """One long-lived StepStream call for the session; `timeout` bounds the whole
        stream (default: no deadline). Close it, or use `with`."""
        return StepStream(self, session_id, timeout)

    def get_session(self, session_id: str, *, timeout: Seconds = None) -> SessionInfo:
        return finish(self._call(calls.get_session(session_id), timeout))

    def fork_session(
        self, session_id: str, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        """A new session whose state is a copy of this one's; the two evolve apart."""
        call = calls.fork_session(session_id, ttl_seconds, request_id)
        return finish(self._call(call, timeout))

    def export_session(self, session_id: str, *, timeout: Seconds = None) -> SessionState:
        return finish(self._call(calls.export_session(session_id), timeout))

    def import_session(
        self, state: bytes, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> SessionInfo:  # fmt: skip
        """A new session from `export_session(...).state` (of this server or another)."""
        call = calls.import_session(state, ttl_seconds, request_id)
        return finish(self._call(call, timeout))

    def delete_session(self, session_id: str, *, timeout: Seconds = None) -> None:
        finish(self._call(calls.delete_session(session_id), timeout))

    def generate(
        self, session_id: str, text: str, *, timeout: Seconds = None,
        request_id: str | None = None, **sampling: Unpack[Sampling],
    ) -> Generation:  # fmt: skip
        """Start a dialogue model's reply to `text`: iterate the returned `Generation` for
        its pieces. Sampling options (`Sampling`: max_tokens, temperature, top_k, top_p,
        seed, stop, presence_penalty) that are not given take the server's defaults.
        `timeout` covers the whole reply, retries included."""
        request = calls.generate(session_id, text, sampling, request_id)
        return Generation(self, request, timeout)

    def close(self) -> None:
        """Cancel the step streams still open, then close the channel."""
        self._cancel_streams()
        self._watchdog.stop()
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, *details: object) -> None:
        self.close()


class Generation(GenerationCore):
    """A reply being generated: iterate it for the text pieces as they are decoded; then
    `done` holds how it ended. A call that fails in a way the client's `RetryPolicy`
    retries is sent again with the same request id and resumed: the iteration goes on where
    it was, without repeating a piece. `cancel()` stops it (from another thread or a signal
    handler too): the iteration then ends quietly and `done` stays None. `result()` waits
    for the end and returns `done`."""

    client: Client

    async def _receive(self, limit: Seconds) -> memserve_pb2.GenerateResponse | None:
        call = self._call
        timer = None if limit is None else self.client._watchdog.arm(limit, call, self._expire)
        try:
            message: memserve_pb2.GenerateResponse = next(call)
        except StopIteration:
            return None
        finally:
            if timer is not None:
                self.client._watchdog.disarm(timer)
        return message

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = finish(self._next_piece())
        if piece is None:
            raise StopIteration
        return piece

    def result(self) -> GenerateDone:
        """The end of the reply (the rest of the pieces are consumed); MemserveError
        CANCELLED if it was cancelled."""
        return finish(self._result())


class Watchdog:
    """One thread per client that gives up the reads that outlast their time: gRPC's
    blocking streams have no read timeout. `arm` a read's limit before it, `disarm` it
    after; a limit that runs out calls `on_expiry(call)` (which cancels the call, so the
    read ends). The thread starts with the first read that needs it and ends with `stop`
    (the client's close)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.armed: dict[int, tuple[float, Any, Callable[[Any], None]]] = {}
        self.keys = itertools.count()
        self.thread: threading.Thread | None = None
        self.stopped = False

    def arm(self, seconds: float, call: Any, on_expiry: Callable[[Any], None]) -> int:
        with self.condition:
            key = next(self.keys)
            self.armed[key] = (time.monotonic() + seconds, call, on_expiry)
            if self.thread is None and not self.stopped:
                self.thread = threading.Thread(
                    target=self._run, name="memserve-watchdog", daemon=True
                )
                self.thread.start()
            self.condition.notify()
            return key

    def disarm(self, key: int) -> None:
        with self.condition:
            self.armed.pop(key, None)

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.armed.clear()
            self.condition.notify()

    def _run(self) -> None:
        while True:
            with self.condition:
                while True:
                    if self.stopped:
                        return
                    if not self.armed:
                        self.condition.wait()
                        continue
                    key, (end, call, on_expiry) = min(
                        self.armed.items(), key=lambda item: item[1][0]
                    )
                    left = end - time.monotonic()
                    if left <= 0:
                        del self.armed[key]
                        break
                    self.condition.wait(left)
            on_expiry(call)  # outside the lock: it cancels a gRPC call
            del call, on_expiry


class StepStream(StepStreamCore):
    """Steps of one session over one long-lived StepStream call, answered in order.

    A stream that met an error or an interrupt is over (the server ends the call, or it is
    cancelled): open a new one. Opened from a `Session`, each step carries the session's
    step count as `expected_step` and updates it. Close it, or use `with` (a block that
    raises cancels it); one left open ends with its `Session`'s block, or is cancelled when
    its client closes.
    """

    def __init__(
        self, client: Client, session_id: str, timeout: Seconds, session: Session | None = None
    ) -> None:
        super().__init__(client, session_id, session)
        self._requests: queue.SimpleQueue[memserve_pb2.StepRequest | None] = queue.SimpleQueue()
        self._call: Any = client.stub.StepStream(
            iter(self._requests.get, None),
            timeout=timeout,
            metadata=with_session(client.metadata, session_id),
        )
        # gRPC reads the requests in a thread of its own until the None that ends them:
        # put it there even if the stream is dropped without being closed.
        weakref.finalize(self, self._requests.put, None)

    async def _exchange(self, request: memserve_pb2.StepRequest) -> memserve_pb2.StepResponse:
        self._requests.put(request)
        try:
            response: memserve_pb2.StepResponse = next(self._call)
        except grpc.RpcError as rpc_error:
            raise MemserveError.from_rpc(rpc_error) from None
        except StopIteration:
            raise MemserveError(grpc.StatusCode.INTERNAL, "the stream ended early") from None
        return response

    def _abort(self) -> None:
        self._requests.put(None)
        self._call.cancel()

    async def _finish(self) -> None:
        self._requests.put(None)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # it ended anyway

    def step(self, inputs: Array, *, expected_step: int | None = None) -> Stepped[Array]:
        """Send `inputs` `[T, input_size]` and wait for their outputs."""
        return finish(self._step(inputs, expected_step))

    def close(self) -> None:
        """End the stream (the server finishes it normally)."""
        finish(self._close())

    def __enter__(self) -> StepStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, *details: object) -> None:
        finish(self._exit(kind is not None))


class Session(SessionCore[Client]):
    """A session on the server, used by one client at a time; deleted when its `with`
    block ends (or by `delete()`), and so are the step streams it opened that are still
    open (closed, or cancelled if the block raised).

    It tracks the session's step count (`step_count`) and sends it as `expected_step` with
    each step, which makes steps safe to retry and refuses them (FAILED_PRECONDITION) if
    something else stepped the session meanwhile. After any failed or cancelled call the
    count is re-read (GetSession) before the next step.
    """

    def synced_step(self, timeout: Seconds = None) -> int:
        """The step count, re-read from the server if a call may have changed it unseen."""
        return finish(self._synced_step(timeout))

    def info(self, *, timeout: Seconds = None) -> SessionInfo:
        """The session as the server sees it now (and its step count, taken over)."""
        return finish(self._info(timeout))

    def step(
        self, inputs: Array, *, timeout: Seconds = None, request_id: str | None = None
    ) -> Array:
        """The outputs `[T, output_size]` of inputs `[T, input_size]`, run once however
        often the call is retried."""
        return finish(self._step(inputs, timeout, request_id))

    def step_stream(self, *, timeout: Seconds = None) -> StepStream:
        return StepStream(self.client, self.id, timeout, session=self)

    def generate(
        self, text: str, *, timeout: Seconds = None, request_id: str | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:  # fmt: skip
        """The reply to `text` (see `Client.generate`); the step count follows it."""
        request = self._generate_request(text, sampling, request_id)
        return Generation(self.client, request, timeout, on_end=self._generated)

    def fork(
        self, *, ttl_seconds: Seconds = None, timeout: Seconds = None,
        request_id: str | None = None,
    ) -> Session:  # fmt: skip
        """A new session continuing from this one's state; both evolve independently."""
        return Session(self.client, finish(self._fork(ttl_seconds, timeout, request_id)))

    def export(self, *, timeout: Seconds = None) -> bytes:
        """The state as bytes that `Client.import_session` turns into a new session."""
        return finish(self._export(timeout))

    def delete(self, *, timeout: Seconds = None) -> None:
        """Delete the session; a session already gone (deleted, expired) is fine."""
        finish(self._delete(timeout))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, *details: object) -> None:
        finish(self._exit(kind is not None))

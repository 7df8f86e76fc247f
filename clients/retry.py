"""When a call is tried again: after UNAVAILABLE or DEADLINE_EXCEEDED, only for calls that
are safe to repeat, with exponential backoff and jitter, a bounded number of attempts, each
with its own time limit, all within the call's deadline.

UNAVAILABLE means the server is draining (it refused the call and changed nothing), it is
gone (killed, restarting), its session store is down, or the connection failed, possibly
after the server had done the work and before its reply arrived. DEADLINE_EXCEEDED of one
attempt (`RetryPolicy.attempt_timeout`, gRPC's per-attempt receive timeout) means the
server or the way to it is stuck; a new attempt may reach it, or another replica, before
the call's own deadline. Either way the client cannot tell whether the work was done, so
a call is repeated only if repeating it is harmless:

- Calls that name themselves with a request id (`new_request_id`: Step, Generate,
  CreateSession, ForkSession, ImportSession; the library sends a fresh one with each and
  the same one on each of its retries). The server answers a repeated id with the first
  call's answer and runs nothing (it waits for the first if that still runs), also after
  a restart on a durable store: so the steps run once, the session is made once. A Step
  with an id runs to its end even if its caller goes away, so its retry finds the answer.
  A Generate turn is all or nothing: a turn cut off is undone, so its retry starts clean,
  and the reply of the retry is the same (its randomness comes from the request's seed,
  else the session's, else the request id), which is why the client can resume the
  stream by skipping what the caller already has (`core.GenerationCore`). A turn undone
  because its caller left answers CANCELLED to the retry that waited for it; for
  Generate, CANCELLED from the server is therefore retried too (nothing of it stays).
- ListModels, GetSession, ExportSession: they read.
- Step carrying `expected_step` (and no id: a caller that cleared it): if an attempt ran
  and its reply was lost, the repeat is refused with FAILED_PRECONDITION instead of
  stepping again; its outputs are lost, so the client raises that FAILED_PRECONDITION
  with a message saying so (see `after_retries`).
- DeleteSession: deleting twice leaves the same state, but if an attempt deleted the
  session and its reply was lost, the repeat answers NOT_FOUND; on an attempt after the
  first, NOT_FOUND therefore counts as success (the session is gone, which is what the call
  asked for).

Never repeated: those calls without an id (and a Step with neither id nor expected_step),
and StepStream (steps in flight).
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass

import grpc

from clients.errors import MemserveError
from protos import memserve_pb2

log = logging.getLogger(__name__)

READS_AND_DELETE = frozenset({"ListModels", "GetSession", "ExportSession", "DeleteSession"})
NAMED_BY_REQUEST_ID = frozenset(
    {"Step", "Generate", "CreateSession", "ForkSession", "ImportSession"}
)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
DEFAULT_ATTEMPT_TIMEOUT = 10.0


def new_request_id() -> str:
    """A fresh request id: 128 random bits in hex (the server takes up to 128 characters)."""
    return secrets.token_hex(16)


class Deadline:
    """The end of a call's time, shared by all its attempts; None: no deadline."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (0 once past), or None without a deadline."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to repeat a call that met UNAVAILABLE or an attempt's
    DEADLINE_EXCEEDED.

    The wait before retry k (k = 1, 2, ...) is
    `min(max_backoff, initial_backoff * multiplier ** (k - 1))`, of which the fraction
    `jitter` is random (0: none; 1: anywhere between 0 and the full wait), so that clients
    turned away together do not come back together. `attempts` counts the first try too:
    1 turns retries off.

    `attempt_timeout`: the most one attempt waits for the server's answer (a unary call's
    reply; a Generate attempt's first message, counted while the caller waits for it), within
    what is left of the call's deadline, as gRPC's per-attempt receive timeout; past it the
    attempt ends with DEADLINE_EXCEEDED and is retried if the call is safe to repeat. Once a
    reply streams, only the call's deadline bounds it: a reply pauses before its end while it
    is written into memory, about as long as it took to decode. 10 s by default: far above
    what a healthy server takes to answer (a launch per step or token, milliseconds each),
    below the 30 s default deadline, so that a stuck server or connection leaves time for
    other attempts. The last attempt has no limit but the deadline (with `attempts=1`,
    none). A Step that takes longer (many steps under heavy load) is not run again by its
    retry, which waits for it on the server; raise the limit for such calls, or set None:
    an attempt may then take all the call's time, and DEADLINE_EXCEEDED is final.
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ValueError(f"attempt_timeout must be > 0 or None, got {self.attempt_timeout}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the second attempt)."""
        try:
            full = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        except OverflowError:  # retry ~1000 of a policy bounded by its deadline, not a count
            full = self.max_backoff if self.initial_backoff > 0 else 0.0
        return full * (1 - self.jitter * random.random())

    def attempt_limit(self, deadline: Deadline, attempt: int) -> float | None:
        """The time limit of attempt number `attempt` (1 for the first): `attempt_timeout`
        or what is left of the call's deadline, whichever ends first (None: neither). The
        last attempt the policy allows has all that is left: cutting it short could only
        turn a call that would succeed into a failure."""
        remaining = deadline.remaining()
        if self.attempt_timeout is None or attempt >= self.attempts:
            return remaining
        return self.attempt_timeout if remaining is None else min(remaining, self.attempt_timeout)

    def delay(
        self, error: MemserveError, remaining: float | None, method: str = ""
    ) -> float | None:
        """Seconds to wait before trying again after `error` (on attempt `error.attempts`),
        or None to give up: not a code to retry, no attempts left, or the wait would outlast
        the deadline (`remaining` seconds; None: no deadline)."""
        if not retryable(method, error.code) or error.attempts >= self.attempts:
            return None
        wait = self.backoff(error.attempts)
        if remaining is not None and wait >= remaining:
            return None
        return wait

    def after_failure(
        self, method: str, request: object, error: MemserveError, deadline: Deadline
    ) -> float | None:
        """After an attempt of `method` failed with `error`: the seconds to wait before the
        next attempt, or None when the call succeeded after all (a retried DeleteSession
        that found the session gone); raises the error to give up with."""
        if safe_to_repeat(method, request):
            delay = self.delay(error, deadline.remaining(), method)
            if delay is not None:
                log.info(
                    "%s attempt %d failed with %s (%s); attempt %d in %.3f s",
                    method, error.attempts, error.code.name, error.message,
                    error.attempts + 1, delay,
                )  # fmt: skip
                return delay
        final = after_retries(method, error)
        if final is not None:
            raise final
        return None


NO_RETRIES = RetryPolicy(attempts=1)


def retryable(method: str, code: grpc.StatusCode) -> bool:
    """Whether an attempt of `method` that ended with `code` may be followed by another
    (if the call is safe to repeat): UNAVAILABLE, DEADLINE_EXCEEDED, and for Generate the
    server's CANCELLED (a turn cut short is undone: nothing of it stays)."""
    return code in RETRYABLE or (method == "Generate" and code == grpc.StatusCode.CANCELLED)


def safe_to_repeat(method: str, request: object) -> bool:
    """Whether `request` to `method` may be sent again after a failure that `retryable`
    accepts."""
    if method in READS_AND_DELETE:
        return True
    if method in NAMED_BY_REQUEST_ID and str(getattr(request, "request_id", "")):
        return True
    return isinstance(request, memserve_pb2.StepRequest) and request.HasField("expected_step")


def after_retries(method: str, error: MemserveError) -> MemserveError | None:
    """What the final error of a call that was retried means: None when it says that an
    earlier attempt succeeded (DeleteSession's NOT_FOUND), else the error to raise."""
    if error.attempts == 1:
        return error
    if method == "DeleteSession" and error.code == grpc.StatusCode.NOT_FOUND:
        return None
    if method == "Step" and error.code == grpc.StatusCode.FAILED_PRECONDITION:
        return MemserveError(
            error.code,
            f"{error.message} (attempt {error.attempts}, a retry: an earlier attempt most "
            "likely ran some or all of these steps and its reply was lost, and the server "
            "no longer has its answer; their outputs cannot be recovered, GetSession shows "
            "the step count)",
            error.attempts,
        )
    return error

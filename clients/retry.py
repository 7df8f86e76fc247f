"""When a call is tried again: only on UNAVAILABLE, only for calls that are safe to repeat,
with exponential backoff and jitter, a bounded number of attempts, within the call's deadline.

UNAVAILABLE means the server is draining (it refused the call and changed nothing) or the
connection failed, possibly after the server had done the work and before its reply
arrived. A call is repeated only if doing it twice is harmless:

- ListModels, GetSession, ExportSession: they read.
- Step carrying `expected_step`: if an attempt ran (some or all of its steps: a call cut
  off stops at the server's next launch, and the steps taken stay taken) and its reply was
  lost, the repeat is refused with FAILED_PRECONDITION instead of stepping again. The lost
  outputs cannot be recovered, so the client raises that FAILED_PRECONDITION with a
  message saying so (see `after_retries`); a Step without `expected_step` is never
  repeated.
- DeleteSession: deleting twice leaves the same state, but if an attempt deleted the
  session and its reply was lost, the repeat answers NOT_FOUND; on an attempt after the
  first, NOT_FOUND therefore counts as success (the session is gone, which is what the call
  asked for).

Never repeated: CreateSession, ForkSession, ImportSession (a repeat would make a second
session), Generate (it writes the text into memory) and StepStream (steps in flight).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from clients.errors import MemserveError
from protos import memserve_pb2

SAFE_TO_REPEAT = frozenset({"ListModels", "GetSession", "ExportSession", "DeleteSession"})


class Deadline:
    """The end of a call's time, shared by all its attempts; None: no deadline."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (0 once past), or None without a deadline."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to repeat a call that met UNAVAILABLE.

    The wait before retry k (k = 1, 2, ...) is
    `min(max_backoff, initial_backoff * multiplier ** (k - 1))`, of which the fraction
    `jitter` is random (0: none; 1: anywhere between 0 and the full wait), so that clients
    turned away together do not come back together. `attempts` counts the first try too:
    1 turns retries off.
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the second attempt)."""
        full = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return full * (1 - self.jitter * random.random())

    def delay(self, error: MemserveError, remaining: float | None) -> float | None:
        """Seconds to wait before trying again after `error` (on attempt `error.attempts`),
        or None to give up: not UNAVAILABLE, no attempts left, or the wait would outlast
        the deadline (`remaining` seconds; None: no deadline)."""
        if error.code != grpc.StatusCode.UNAVAILABLE or error.attempts >= self.attempts:
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
            delay = self.delay(error, deadline.remaining())
            if delay is not None:
                return delay
        final = after_retries(method, error)
        if final is not None:
            raise final
        return None


NO_RETRIES = RetryPolicy(attempts=1)


def safe_to_repeat(method: str, request: object) -> bool:
    """Whether `request` to `method` may be sent again after UNAVAILABLE."""
    if method == "Step":
        return isinstance(request, memserve_pb2.StepRequest) and request.HasField("expected_step")
    return method in SAFE_TO_REPEAT


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
            f"{error.message} (attempt {error.attempts}, retried after UNAVAILABLE: an "
            "earlier attempt most likely ran some or all of these steps and its reply was "
            "lost; their outputs cannot be recovered, GetSession shows the step count)",
            error.attempts,
        )
    return error

"""What a session's queue holds: calls that advance by one operation per launch.

A call says which operation it needs next and with what argument (`next_row`), and takes
that operation's result (`take`). `StepCall` is a Step call of T rows; `GenerateCall`
(`serving.generation`) is a Generate call. The scheduler moves calls along and never awaits
anything: the engine attaches a future to each call and resolves it when the scheduler
reports the call finished.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.protocol import Operation
from serving.sessions import Session


@dataclass(eq=False, kw_only=True)
class Call:
    """One call on one session, queued behind the session's earlier calls."""

    session: Session
    enqueued: float  # time.perf_counter() at arrival
    expected_step: int | None = None  # the step count the call must start from, if any
    started: bool = False  # its first row was scheduled
    finished: bool = False  # answered (or given up): off its session's queue
    left: bool = False  # its caller left, for a driver without futures (the engine cancels)
    result: int | None = None  # the session's step count once done
    error: Exception | None = None  # why it failed, if it did
    request_id: str = ""  # names the call for retries (serving.requests)
    digest: bytes = b""  # what the request asked for, to tell a repeat from a new request
    from_step: int = 0  # the session's step when its first row was scheduled
    # Its rows landed, as its journal records them (a STEP row: its steps' inputs, k x input)
    ops: list[tuple[Operation, Any]] = field(default_factory=list, repr=False)
    future: asyncio.Future[int] | None = field(default=None, repr=False)  # the engine's

    @property
    def abandoned(self) -> bool:
        """Its caller left: it stops at the next launch. Not a call that `runs_to_end`."""
        if self.runs_to_end():
            return False
        return self.left or (self.future is not None and self.future.cancelled())

    def runs_to_end(self) -> bool:
        """Whether the call goes on when its caller leaves, so that a retry under its request
        id finds its answer."""
        return False

    def next_row(self, most: int = 1) -> tuple[Operation, Any, int]:
        """The operation this call needs in the next launch, its argument and how many steps
        of it the row runs: up to `most`, where the call knows that many ahead (a Step call's
        inputs), else one."""
        raise NotImplementedError

    def runs_ahead(self) -> bool:
        """Whether `next_row` may be called while earlier rows of this call are in flight:
        only if the next does not depend on their results."""
        return False

    def take(self, output: Any) -> bool:
        """Consume the result of that operation; True once the call is complete."""
        raise NotImplementedError

    def finish(self, result: int | None = None, error: Exception | None = None) -> None:
        """Mark the call answered, with the session's step count or an error."""
        self.finished = True
        self.result, self.error = result, error


@dataclass(eq=False, kw_only=True)
class StepCall(Call):
    """A Step call: T rows of inputs, up to the scheduler's `steps_per_launch` of them in
    each launch; outputs filled in as they land."""

    inputs: np.ndarray  # [T, input_size] float32
    outputs: np.ndarray  # [T, output_size] float32
    sent: int = 0  # rows handed to launches
    done: int = 0  # rows whose outputs came back (launches land in the order sent)

    def next_row(self, most: int = 1) -> tuple[Operation, Any, int]:
        start = self.sent
        self.sent = min(len(self.inputs), start + most)
        return Operation.STEP, self.inputs[start : self.sent], self.sent - start

    def runs_ahead(self) -> bool:
        return self.sent < len(self.inputs)  # a step's inputs are all known up front

    def runs_to_end(self) -> bool:
        return bool(self.request_id)

    def take(self, output: Any) -> bool:
        """`output`: this row's `[steps, output_size]` outputs."""
        self.outputs[self.done : self.done + len(output)] = output
        self.done += len(output)
        return self.done == len(self.inputs)

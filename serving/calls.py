"""What a session's queue holds: calls that advance one operation per launch of the batch
loop. `StepWork` (a Step call of T steps) and `generation.GenerateWork` (a Generate call)
say which operation they need next (`next_op`) and take its result (`take`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from serving.sessions import Session

# The operations a launch can run, each batched over the sessions that need it:
# "step" (model.step, a row of inputs), "encode" (a token into memory), "begin" (start a
# reply: noise, uniform), "decode" (previous token and sampling settings -> next token).
OPERATIONS = ("step", "encode", "begin", "decode")


@dataclass(eq=False, kw_only=True)
class Work:
    """One call on one session, queued behind the session's earlier calls."""

    session: Session
    future: asyncio.Future[int]  # the session's step count once the call is done
    enqueued: float  # time.perf_counter() at arrival
    expected_step: int | None = None
    started: bool = False
    finished: bool = False  # answered (or its caller left): off its session's queue

    def next_op(self) -> tuple[str, Any]:
        """The operation this call needs in the next launch, and its argument."""
        raise NotImplementedError

    def runs_ahead(self) -> bool:
        """Whether `next_op` may be called while earlier operations of this call are in
        flight: only if the next does not depend on their results."""
        return False

    def take(self, result: Any) -> bool:
        """Consume the result of that operation; True once the call is complete."""
        raise NotImplementedError


@dataclass(eq=False, kw_only=True)
class StepWork(Work):
    """A Step call: T rows of inputs, one per launch; outputs filled in as they run."""

    inputs: np.ndarray  # [T, input_size] float32
    outputs: np.ndarray  # [T, output_size] float32
    sent: int = 0  # rows handed to launches
    done: int = 0  # rows whose outputs came back (launches land in the order sent)

    def next_op(self) -> tuple[str, Any]:
        self.sent += 1
        return "step", self.inputs[self.sent - 1]

    def runs_ahead(self) -> bool:
        return self.sent < len(self.inputs)  # a step's inputs are all known up front

    def take(self, result: Any) -> bool:
        self.outputs[self.done] = result
        self.done += 1
        return self.done == len(self.inputs)

"""What a load generator's request is (`Workload`: its RPC, the CreateSession of a session,
one request on a session) and how an answer is judged: `step_outcome` for a Step,
`reply_outcome` for a streamed Generate reply, across the attempts of a retried request
(`Heard`). The workloads are in `workloads.py` (memserve.v1) and `kserve.py` (the v2 API).
"""

from __future__ import annotations

from typing import Any

from clients.channel import Metadata
from clients.loadgen.recording import OK, Outcome
from clients.loadgen.schedule import Session, now
from protos import memserve_pb2


class Workload:
    """What a request is: its RPC (`method`), the CreateSession of the n-th session, and one
    request on a session; `release` lets go of what a session holds (an open stream) before
    it is deleted. A workload with `sequences` (the v2 API's) starts and ends its sessions
    with its own requests: it names a session (`name`), and `end`s one cut short."""

    method = ""
    sequences = False

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        raise NotImplementedError

    async def call(self, session: Session, timeout: float | None, metadata: Metadata) -> Outcome:
        """One request; raises grpc.aio.AioRpcError when the server refuses it."""
        raise NotImplementedError

    async def release(self, session: Session) -> None:
        """Before the session is deleted (nothing to do unless the workload holds a call)."""

    def name(self, sequence: int) -> str:
        raise NotImplementedError

    def unfinished(self, session: Session) -> bool:
        return False

    async def end(self, session: Session, timeout: float | None, metadata: Metadata) -> None:
        raise NotImplementedError


def step_outcome(
    response: memserve_pb2.StepResponse, steps: int, output_size: int, invalid: str
) -> Outcome:
    """A Step answer, just arrived: OK with its `steps`, or `invalid` if its outputs are not
    `steps x output_size` floats."""
    done = now()
    expected = steps * output_size * 4
    if len(response.outputs.data) != expected:
        detail = f"outputs of {len(response.outputs.data)} bytes, expected {expected}"
        return Outcome(invalid, done, detail)
    return Outcome(OK, done, steps=steps)


class Heard:
    """What a Generate request has received over its attempts: the reply's text and when
    each piece of it first arrived."""

    def __init__(self) -> None:
        self.text = ""
        self.pieces: list[float] = []


async def reply_outcome(stream: Any, invalid: str, heard: Heard | None = None) -> Outcome:
    """A Generate call read to its end: OK with when each text piece came and what the final
    message says, or `invalid` if that message is missing or is not last, or if the reply
    does not continue what an earlier attempt of the request heard (`heard`, kept up to
    date: the pieces of a retry that replay it are not counted again)."""
    heard = heard if heard is not None else Heard()
    first = not heard.pieces  # no earlier attempt of the request heard anything
    replayed = ""  # this attempt's text so far
    done: memserve_pb2.GenerateDone | None = None
    finished = 0.0
    late = False
    async for message in stream:
        moment = now()
        if done is not None:
            late = True
        elif message.HasField("done"):
            done, finished = message.done, moment
        else:
            replayed += message.text
            known = min(len(replayed), len(heard.text))
            if replayed[:known] != heard.text[:known]:
                return Outcome(invalid, moment, "a retry replied otherwise than its first attempt")
            if first or len(replayed) > len(heard.text):
                heard.text = replayed
                heard.pieces.append(moment)
    if done is None or late:
        what = "a message after the final one" if late else "no final message"
        return Outcome(invalid, now(), f"the stream sent {what}")
    if len(replayed) < len(heard.text):
        return Outcome(invalid, finished, "a retry replied otherwise than its first attempt")
    return Outcome(
        OK,
        finished,
        pieces=list(heard.pieces),
        completion_tokens=done.completion_tokens,
        prompt_tokens=done.prompt_tokens,
        finish_reason=done.finish_reason or "?",
    )

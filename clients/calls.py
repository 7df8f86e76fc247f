"""Every unary RPC of memserve.v1.MemServe as a `Call`: the request to send and how its reply
reads. Both faces send these (`core.ClientCore._call`); which calls may be sent again, and
after what, is `retry.py`. Generate and StepStream are streams, opened by the faces
themselves (their requests are in `messages.py`).

The calls that change something (Step, CreateSession, ForkSession, ImportSession, and
Generate) carry a request id: the caller's, else a fresh one (`retry.new_request_id`). The
request is built once, so every retry of the call sends the same id, and the server answers
a repeat with the first answer instead of running it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from clients import messages
from clients.messages import Array, ModelInfo, SessionInfo, SessionState, Stepped
from clients.retry import new_request_id
from protos import memserve_pb2

R = TypeVar("R")


@dataclass(frozen=True)
class Call(Generic[R]):
    """One unary call: `method` of the MemServe service, its `request` message, and `parse`,
    which turns the reply message into what the library returns."""

    method: str
    request: Any
    parse: Callable[[Any], R]


def list_models() -> Call[list[ModelInfo]]:
    return Call(
        "ListModels",
        memserve_pb2.ListModelsRequest(),
        lambda reply: [messages.model_info(model) for model in reply.models],
    )


def create_session(
    model: str, ttl_seconds: float | None, seed: int | None, request_id: str | None = None
) -> Call[SessionInfo]:
    request = memserve_pb2.CreateSessionRequest(
        model=model, ttl_seconds=ttl_seconds, seed=seed, request_id=request_id or new_request_id()
    )
    return Call("CreateSession", request, messages.session_info)


def step(
    session_id: str, inputs: Array, expected_step: int | None, request_id: str | None = None
) -> Call[Stepped[Array]]:
    """T steps of `inputs` `[T, input_size]`; the outputs come back as the kind of array the
    inputs are."""
    request = messages.step_request(
        session_id, inputs, expected_step, request_id or new_request_id()
    )
    return Call("Step", request, lambda reply: messages.stepped(reply, inputs))


def get_session(session_id: str) -> Call[SessionInfo]:
    request = memserve_pb2.GetSessionRequest(session_id=session_id)
    return Call("GetSession", request, messages.session_info)


def fork_session(
    session_id: str, ttl_seconds: float | None, request_id: str | None = None
) -> Call[SessionInfo]:
    request = memserve_pb2.ForkSessionRequest(
        session_id=session_id, ttl_seconds=ttl_seconds, request_id=request_id or new_request_id()
    )
    return Call("ForkSession", request, messages.session_info)


def export_session(session_id: str) -> Call[SessionState]:
    request = memserve_pb2.ExportSessionRequest(session_id=session_id)
    return Call("ExportSession", request, messages.session_state)


def import_session(
    state: bytes, ttl_seconds: float | None, request_id: str | None = None
) -> Call[SessionInfo]:
    request = memserve_pb2.ImportSessionRequest(
        state=state, ttl_seconds=ttl_seconds, request_id=request_id or new_request_id()
    )
    return Call("ImportSession", request, messages.session_info)


def delete_session(session_id: str) -> Call[None]:
    """Its reply says nothing; a retried DeleteSession that finds the session gone has no
    reply at all (`parse(None)`)."""
    request = memserve_pb2.DeleteSessionRequest(session_id=session_id)
    return Call("DeleteSession", request, lambda reply: None)


def generate(
    session_id: str, text: str, sampling: messages.Sampling, request_id: str | None = None
) -> memserve_pb2.GenerateRequest:
    """A Generate turn's request (a stream: `core.GenerationCore` sends it, and again on
    each retry, id and all)."""
    return messages.generate_request(session_id, text, sampling, request_id or new_request_id())

"""The records the engine commits to a session store (`protos/journal.proto`), built from
what happened: a session began, a call finished, a state was written in whole, a session
ended. A call's record holds the operations its rows ran, in order, which is all a replay
needs, and its answer when it has a request id."""

from __future__ import annotations

import time

import torch

from protos import journal_pb2, memserve_pb2, tensors
from serving.calls import Call, StepCall
from serving.durable.records import operation_record
from serving.export import export_state
from serving.generation import GenerateCall
from serving.protocol import steps_of
from serving.sessions import Session


def created(
    session: Session,
    weights_digest: str,
    state: dict[str, torch.Tensor] | None,
    request_id: str = "",
    digest: bytes = b"",
) -> journal_pb2.Record:
    """A session began at its step: in the model's initial state (`state` None), or with
    `state` (a fork, an import)."""
    record = journal_pb2.SessionCreated(
        session_id=session.id,
        model=session.model,
        weights_digest=weights_digest,
        ttl_seconds=session.ttl,
        step=session.step,
        request_id=request_id,
        request_digest=digest,
        unix_time=time.time(),
        tenant=session.tenant,
    )
    if session.seed is not None:
        record.seed = session.seed
    if state is not None:
        record.state = export_state(state, session.model, weights_digest, session.step)
    return journal_pb2.Record(created=record)


def response(call: Call) -> journal_pb2.Response | None:
    """What a call with a request id answered (None without one)."""
    if not call.request_id:
        return None
    answer = journal_pb2.Response(request_id=call.request_id, request_digest=call.digest)
    if isinstance(call, StepCall):
        if call.done < len(call.inputs):
            answer.cancelled = f"cut short after {call.done} of {len(call.inputs)} steps"
        else:
            step = memserve_pb2.StepResponse(step=call.result or 0)
            tensors.encode_into(step.outputs, call.outputs)
            answer.step.CopyFrom(step)
    elif isinstance(call, GenerateCall):
        answer.reply.pieces.extend(call.sent_pieces)
        answer.reply.done.CopyFrom(call.done_message())
    return answer


def call_committed(
    call: Call, answer: journal_pb2.Response | None = None
) -> journal_pb2.Record | None:
    """A finished call's operations from its first step to the session's step now, with
    `answer`, what it answered its request id (None if it ran none)."""
    if not call.ops:
        return None
    record = journal_pb2.CallCommitted(
        session_id=call.session.id,
        from_step=call.from_step,
        to_step=call.from_step + steps_of(call.ops),
        operations=[operation_record(operation, argument) for operation, argument in call.ops],
    )
    if answer is not None:
        record.response.CopyFrom(answer)
    return journal_pb2.Record(call=record)


def snapshot(
    session: Session, weights_digest: str, state: dict[str, torch.Tensor]
) -> journal_pb2.Record:
    """The session's whole state at its step, with the answers its retries may still need."""
    return journal_pb2.Record(
        snapshot=journal_pb2.Snapshot(
            session_id=session.id,
            step=session.step,
            state=export_state(state, session.model, weights_digest, session.step),
            responses=session.requests.answered(),
        )
    )


def deleted(session: Session, why: str) -> journal_pb2.Record:
    return journal_pb2.Record(deleted=journal_pb2.SessionDeleted(session_id=session.id, why=why))

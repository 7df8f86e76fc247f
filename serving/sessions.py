"""Sessions: what the server keeps per conversation, the table that finds them by id, and
the format a session's state travels in (ExportSession / ImportSession).

A session's tensors live in one slot of its model's state pool while it is active, or in
the parking store while it is parked; its step count always says how many steps its state
has taken. The engine that owns the session's model changes all of this; the table only
maps ids to sessions and remembers recently ended ones so NOT_FOUND can say why.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from serving.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from serving.work import Work

EXPORT_FORMAT = "memserve-session"
EXPORT_VERSION = 1


def new_session_id() -> str:
    """128 random bits, as 32 hex digits."""
    return secrets.token_hex(16)


@dataclass(eq=False)
class Session:
    """One session of one model."""

    id: str
    model: str
    ttl: float  # seconds idle before it expires
    last_used: float  # time.monotonic() of its last completed request
    step: int = 0  # steps its state has taken
    slot: int | None = None  # its slot in the pool; None while parked
    seed: int | None = None
    pending: deque[Work] = field(default_factory=deque)  # its calls, in arrival order
    in_flight: int = 0  # its rows in launches sent to the model and not yet landed


class SessionTable:
    """Every live session of the server by id, across models."""

    def __init__(self, remember_ended: int = 65536) -> None:
        self.sessions: dict[str, Session] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()  # id -> why, for NOT_FOUND messages
        self.remember_ended = remember_ended

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session

    def remove(self, session: Session, why: str) -> None:
        """Forget a session; later lookups answer NOT_FOUND saying `why` (e.g. "expired")."""
        self.sessions.pop(session.id, None)
        self.ended[session.id] = why
        while len(self.ended) > self.remember_ended:
            self.ended.popitem(last=False)

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is not None:
            return session
        if not session_id:
            raise InvalidArgument("session_id is empty")
        why = self.ended.get(session_id)
        if why is not None:
            raise NotFound(f"session {session_id} {why}")
        raise NotFound(f"no session {session_id!r} on this server")

    def __len__(self) -> int:
        return len(self.sessions)


def export_state(state: dict[str, torch.Tensor], model: str, model_digest: str, step: int) -> bytes:
    """A session's state as safetensors bytes; the metadata names the model and the step."""
    metadata = {
        "format": EXPORT_FORMAT,
        "version": str(EXPORT_VERSION),
        "model": model,
        "model_digest": model_digest,
        "step": str(step),
    }
    return save_safetensors({n: t.contiguous() for n, t in state.items()}, metadata=metadata)


@dataclass(frozen=True)
class ImportedState:
    tensors: dict[str, torch.Tensor]
    model: str
    model_digest: str
    step: int


def import_state(data: bytes) -> ImportedState:
    """Parse what `export_state` wrote; InvalidArgument naming what is wrong otherwise."""
    if len(data) < 8:
        raise InvalidArgument("state is not a memserve session export (too short)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise InvalidArgument("state is not a memserve session export (bad safetensors header)")
    try:
        header = json.loads(data[8 : 8 + header_size])
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != EXPORT_FORMAT:
            raise InvalidArgument("state is not a memserve session export (no format metadata)")
        if metadata.get("version") != str(EXPORT_VERSION):
            raise InvalidArgument(
                f"state has export version {metadata.get('version')!r}; "
                f"this server reads version {EXPORT_VERSION}"
            )
        step = int(metadata["step"])
        if not 0 <= step < 2**63:
            raise ValueError(f"step {step} is out of range")
        if not metadata.get("model_digest"):
            raise ValueError("it names no model_digest (the weights it was made with)")
        tensors = load_safetensors(data)
        return ImportedState(
            tensors=tensors,
            model=str(metadata["model"]),
            model_digest=str(metadata["model_digest"]),
            step=step,
        )
    except InvalidArgument:
        raise
    except Exception as error:  # any malformation safetensors or json can report
        raise InvalidArgument(f"state is not a readable session export: {error}") from error

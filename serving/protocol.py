"""The typed boundary between the server and a model's process (`serving.worker`).

The server sends requests on a socket pair, each framed by `frame` (a length, then the
pickle: the server writes them without ever blocking, `serving.worker_client`); the worker
reads them with `read_frame` and answers each with a `Reply` (`Connection.send`), in the
order sent. A `Launch` is one iteration of the batch loop: the slots whose
state leaves the pool (parked sessions, read out first), the states that come back into it
(restored sessions, written next), then one `OperationBatch` per operation some session
needs. The other requests reset, copy, read or write one slot. At start the worker sends a
`ModelCard`: everything the server needs to know of the model, so that it never loads the
weights itself.

Adding an operation: a member of `Operation`, its batch class here (with `of`, which stacks
the per-row arguments a call gives), its line in `serving.worker.run_batch`, and the call that
asks for it.
"""

from __future__ import annotations

import enum
import pickle
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from models.state import StateSpec, state_bytes

# A session's state as it crosses the pipe: one array per `StateSpec`.
HostState = dict[str, np.ndarray]


class Operation(enum.Enum):
    """What one row of a launch does to its session."""

    STEP = "step"  # model.step: a row of inputs in, a row of outputs back
    ENCODE = "encode"  # a token written into the dialogue memory
    BEGIN = "begin"  # a reply starts: z drawn from the prior with the given noise
    DECODE = "decode"  # the previous token in, the next one (sampled in the worker) back


def steps_of(rows: Iterable[tuple[Operation, Any]]) -> int:
    """The steps a session's rows took: a STEP row's argument holds one input per step
    (`[k, input_size]`), every other row is one step."""
    return sum(len(argument) if operation is Operation.STEP else 1 for operation, argument in rows)


@dataclass(frozen=True)
class StepBatch:
    """`model.step` for the sessions in `slots`, up to K steps each, back to back: `inputs`
    float32 `[B, K, input_size]`, `steps` int64 `[B]`, non-increasing, each in [1, K]. Row i
    takes `steps[i]` steps (inputs beyond them are padding); its outputs come back as
    `[B, K, output_size]`, zeros past its steps."""

    operation: ClassVar[Operation] = Operation.STEP
    slots: np.ndarray
    inputs: np.ndarray
    steps: np.ndarray

    @classmethod
    def of(cls, slots: np.ndarray, rows: Sequence[np.ndarray]) -> StepBatch:
        """`rows`: each session's `[steps, input_size]` inputs, most steps first."""
        counts = [len(row) for row in rows]
        if len(set(counts)) == 1:  # every row the same length: no padding
            inputs = np.stack(rows).astype(np.float32, copy=False)
        else:
            width = rows[0].shape[-1] if rows else 0
            inputs = np.zeros((len(rows), max(counts, default=1), width), np.float32)
            for index, row in enumerate(rows):
                inputs[index, : len(row)] = row
        return cls(slots, inputs, np.array(counts, np.int64))


@dataclass(frozen=True)
class EncodeBatch:
    """One token per session into its memory: `tokens` int64 `[B]`."""

    operation: ClassVar[Operation] = Operation.ENCODE
    slots: np.ndarray
    tokens: np.ndarray

    @classmethod
    def of(cls, slots: np.ndarray, rows: Sequence[int]) -> EncodeBatch:
        return cls(slots, np.array(rows, np.int64))


@dataclass(frozen=True)
class BeginRow:
    """A reply's randomness: standard-normal noise for z, a uniform that picks its component."""

    noise: np.ndarray
    uniform: float


@dataclass(frozen=True)
class BeginBatch:
    """Start a reply per session: `noise` float32 `[B, latent]`, `uniform` float32 `[B]`."""

    operation: ClassVar[Operation] = Operation.BEGIN
    slots: np.ndarray
    noise: np.ndarray
    uniform: np.ndarray

    @classmethod
    def of(cls, slots: np.ndarray, rows: Sequence[BeginRow]) -> BeginBatch:
        noise = np.stack([row.noise for row in rows]).astype(np.float32)
        return cls(slots, noise, np.array([row.uniform for row in rows], np.float32))


@dataclass(frozen=True)
class DecodeRow:
    """The previous token and how the next one is chosen (see `serving.sampling`)."""

    previous: int
    temperature: float
    top_k: int
    top_p: float
    uniform: float
    presence_penalty: float = 0.0


@dataclass(frozen=True)
class DecodeBatch:
    """One decoder step per session, the next token sampled in the worker from the logits
    with each row's settings, so that only B token ids come back."""

    operation: ClassVar[Operation] = Operation.DECODE
    slots: np.ndarray
    previous: np.ndarray  # int64 [B]
    temperature: np.ndarray  # float64 [B], 0: greedy
    top_k: np.ndarray  # int64 [B], 0: no limit
    top_p: np.ndarray  # float64 [B]
    uniform: np.ndarray  # float64 [B], in [0, 1)
    presence_penalty: np.ndarray  # float32 [B], >= 0 (VMED.decode; staged to the device)

    @classmethod
    def of(cls, slots: np.ndarray, rows: Sequence[DecodeRow]) -> DecodeBatch:
        def column(name: str, dtype: type) -> np.ndarray:
            return np.array([getattr(row, name) for row in rows], dtype)

        return cls(
            slots,
            column("previous", np.int64),
            column("temperature", np.float64),
            column("top_k", np.int64),
            column("top_p", np.float64),
            column("uniform", np.float64),
            column("presence_penalty", np.float32),
        )


OperationBatch = StepBatch | EncodeBatch | BeginBatch | DecodeBatch
BATCH_TYPES: dict[Operation, Any] = {
    batch.operation: batch for batch in (StepBatch, EncodeBatch, BeginBatch, DecodeBatch)
}


def batch_of(operation: Operation, slots: np.ndarray, rows: Sequence[Any]) -> OperationBatch:
    """The batch of `operation` for these slots, from each row's argument (`Call.next_row`)."""
    batch: OperationBatch = BATCH_TYPES[operation].of(slots, rows)
    return batch


@dataclass(frozen=True)
class Launch:
    """One iteration's work, run by the worker in this order: read `save` and `park` out of
    the pool, write `restore` into it, run `batches` one after the other. `save` keeps a
    session's state before a Generate turn, to undo the turn if it does not finish."""

    batches: tuple[OperationBatch, ...]
    park: tuple[int, ...] = ()
    restore: tuple[tuple[int, HostState], ...] = ()
    save: tuple[int, ...] = ()


@dataclass(frozen=True)
class Landed:
    """What a launch gives back: STEP outputs `[B, K, output_size]` float32 and DECODE tokens
    `[B]` int64 by operation, the states read for `Launch.park` and `Launch.save` in their
    order, and the seconds the worker took."""

    outputs: dict[Operation, np.ndarray]
    parked: tuple[HostState, ...]
    seconds: float
    saved: tuple[HostState, ...] = ()


@dataclass(frozen=True)
class ResetSlot:
    """Put the model's initial state into a slot (a new session)."""

    slot: int


@dataclass(frozen=True)
class CopySlot:
    """Copy one slot's state into another (a fork)."""

    source: int
    destination: int


@dataclass(frozen=True)
class ReadSlot:
    """A host copy of one slot's state (export, or parking outside a launch)."""

    slot: int


@dataclass(frozen=True)
class WriteSlot:
    """Put a whole state into a slot (an import); a state that does not fit changes nothing."""

    slot: int
    state: HostState


@dataclass(frozen=True)
class Replay:
    """A stored session's state: `state` (None: the model's initial one) with `rows` run on
    it one after the other, alone, which gives the bits the batched launches gave."""

    state: HostState | None
    rows: tuple[tuple[Operation, Any], ...]


@dataclass(frozen=True)
class Close:
    """Stop the worker."""


Request = Launch | ResetSlot | CopySlot | ReadSlot | WriteSlot | Replay | Close

_LENGTH = struct.Struct("!Q")


def frame(request: Request) -> tuple[bytes, bytes]:
    """A request as it crosses the socket: its pickle's length (8 bytes), then the pickle."""
    data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)), data


def read_frame(source: socket.socket) -> Request:
    """The next request `frame` wrote to `source` (blocking); EOFError once it is closed."""
    (length,) = _LENGTH.unpack(_read_exactly(source, _LENGTH.size))
    request: Request = pickle.loads(_read_exactly(source, length))
    return request


def _read_exactly(source: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        count = source.recv_into(view[got:])
        if count == 0:
            raise EOFError("the server closed the socket")
        got += count
    return data


@dataclass(frozen=True)
class Reply:
    """The answer to one request: its value, or the exception it raised."""

    ok: bool
    value: Any


@dataclass(frozen=True)
class ModelCard:
    """What the server knows of a model, from its worker: sizes, state, weights, tokenizer."""

    model_type: str
    input_size: int
    output_size: int
    state_specs: tuple[StateSpec, ...]
    initial_state: HostState  # a new session's state, for one that starts parked
    weights_digest: str  # SHA-256 of the weights file: exports import only into the same
    backend: str  # what runs the model's step: "fused-cpu" (the C step), "triton", "torch"
    device: str  # where its pool lives ("cpu", "cuda:0"), as the worker resolved the setting
    tokenizer_json: str | None = None  # dialogue models: the tokenizer, serialised
    text_operations: bool = False  # whether the model has ENCODE, BEGIN and DECODE

    @property
    def memory_shape(self) -> tuple[int, ...]:
        return self.spec("memory").shape

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.state_specs)

    def spec(self, name: str) -> StateSpec:
        return next(spec for spec in self.state_specs if spec.name == name)

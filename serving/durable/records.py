"""What a durable store holds, as bytes: `journal.proto` records framed with their length and
CRC-32, and the conversions between a call's operations and their records.

A frame is `MAGIC | length (u32 LE) | crc32 of the payload (u32 LE) | payload`. A frame cut
short (a crash mid-write) or whose CRC does not match (a flipped byte) is refused with
`CorruptRecordError`, never half-read; `scan` finds the frames of a file and resumes after a bad
one at the next MAGIC.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from protos import journal_pb2, tensors
from serving.protocol import BeginRow, DecodeRow, Operation

MAGIC = b"MSJ1"
HEADER = struct.Struct("<4sII")
MAX_RECORD_BYTES = 1 << 30


class CorruptRecordError(ValueError):
    """Bytes that are not a whole, intact record."""


def frame(record: journal_pb2.Record) -> bytes:
    payload: bytes = record.SerializeToString()
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def end_of_write(start: int, frames: Sequence[bytes]) -> bytes:
    """The frame that ends a write of `frames`, begun at `start` in its segment (`Written`
    in journal.proto). Its CRC is of the frames' headers: each frame's own CRC covers its
    payload, so the write reached the disk whole if every frame in it is intact and their
    headers are these (`whole_writes_end`), at the cost of a few bytes a record, not of
    every byte written."""
    headers = b"".join(framed[: HEADER.size] for framed in frames)
    end = journal_pb2.Written(start=start, crc=zlib.crc32(headers))
    return frame(journal_pb2.Record(written=end))


def unframe(data: bytes | memoryview) -> journal_pb2.Record:
    """The record of one whole frame (CorruptRecordError if it is not one)."""
    record, end = read_frame(data, 0)
    if end != len(data):
        raise CorruptRecordError(f"{len(data) - end} bytes after the record")
    return record


def read_frame(data: bytes | memoryview, offset: int) -> tuple[journal_pb2.Record, int]:
    """The record framed at `offset` and where the next frame starts."""
    if len(data) - offset < HEADER.size:
        raise CorruptRecordError(f"a record's header is cut short at byte {offset}")
    magic, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise CorruptRecordError(f"no record starts at byte {offset}")
    start, end = offset + HEADER.size, offset + HEADER.size + length
    # `frame` never writes an empty record: a length of 0 (whose CRC of nothing is 0) is a
    # header cut short before zeros written ahead.
    if not 0 < length <= MAX_RECORD_BYTES or end > len(data):
        raise CorruptRecordError(f"the record at byte {offset} is cut short")
    payload = bytes(data[start:end])
    if zlib.crc32(payload) != crc:
        raise CorruptRecordError(f"the record at byte {offset} fails its CRC")
    record = journal_pb2.Record()
    try:
        record.ParseFromString(payload)
    except DecodeError as error:  # intact bytes that are no record: another writer's
        raise CorruptRecordError(f"the record at byte {offset} does not parse: {error}") from error
    return record, end


@dataclass(frozen=True)
class Damage:
    """Bytes of a file that hold no readable record."""

    start: int
    end: int
    why: str


def scan(data: bytes) -> Iterator[tuple[int, int, journal_pb2.Record] | Damage]:
    """Every record of a file of frames, with its offset and size, in order; a damaged
    stretch is reported as `Damage` and scanning resumes at the next MAGIC. Zeros to the end
    of the file are no damage: space written ahead that no record has reached."""
    offset = 0
    while offset < len(data):
        # A record begins with MAGIC, never a zero: only then can the rest be zeros (a
        # scan of the rest at every record would make opening quadratic in the file).
        if data[offset] == 0 and data.count(0, offset) == len(data) - offset:
            return
        try:
            record, end = read_frame(data, offset)
        except CorruptRecordError as error:
            resume = data.find(MAGIC, offset + 1)
            resume = len(data) if resume < 0 else resume
            yield Damage(offset, resume, str(error))
            offset = resume
            continue
        yield offset, end - offset, record
        offset = end


def whole_writes_end(
    data: bytes, items: list[tuple[int, int, journal_pb2.Record] | Damage]
) -> int | None:
    """Where the last whole write of a segment (`data`, scanned into `items`) ends: the end
    of its last `Written` that follows the write before it, with every frame since intact
    and their headers the ones it names (`end_of_write`). None for a segment of the older
    format, which does not begin with a `Written` of nothing."""
    first = items[0] if items else None
    if isinstance(first, Damage) or first is None or first[0] != 0:
        return None
    if first[2].WhichOneof("record") != "written" or first[2].written.start != 0:
        return None
    whole = previous = 0  # where the last whole write ends; where the last write ends
    headers: list[bytes] = []
    intact = True
    for item in items:
        if isinstance(item, Damage):
            intact = False
            continue
        offset, length, record = item
        if record.WhichOneof("record") != "written":
            headers.append(data[offset : offset + HEADER.size])
            continue
        crc = zlib.crc32(b"".join(headers))
        if intact and record.written.start == previous and crc == record.written.crc:
            whole = offset + length
        previous, headers, intact = offset + length, [], True
    return whole


# ---------------------------------------------------------------------- operations


def operation_record(operation: Operation, argument: Any) -> journal_pb2.Operation:
    """What replaying one row needs (a decode's sampling settings are not: the state after
    it depends on the previous token only)."""
    if operation is Operation.STEP:
        return journal_pb2.Operation(step=tensors.encode(np.ascontiguousarray(argument)))
    if operation is Operation.ENCODE:
        return journal_pb2.Operation(encode=int(argument))
    if operation is Operation.BEGIN:
        assert isinstance(argument, BeginRow)
        noise = tensors.encode(np.asarray(argument.noise, np.float32))
        return journal_pb2.Operation(begin=journal_pb2.Begin(noise=noise, uniform=argument.uniform))
    assert isinstance(argument, DecodeRow)
    return journal_pb2.Operation(decode=argument.previous)


def replay_row(record: journal_pb2.Operation) -> tuple[Operation, Any]:
    """The operation and argument a worker replays (`serving.worker.replay`)."""
    kind = record.WhichOneof("kind")
    if kind == "step":  # [k, input_size]; [input_size] in records of one step each (older)
        return Operation.STEP, np.atleast_2d(tensors.decode(record.step, "step"))
    if kind == "encode":
        return Operation.ENCODE, record.encode
    if kind == "begin":
        noise = tensors.decode(record.begin.noise, "noise")
        return Operation.BEGIN, BeginRow(noise, record.begin.uniform)
    if kind == "decode":
        return Operation.DECODE, DecodeRow(record.decode, 0.0, 0, 1.0, 0.0)
    raise CorruptRecordError(f"an operation of unknown kind {kind!r}")


def request_digest(*parts: bytes | str) -> bytes:
    """SHA-256 over what a request asks for, so a repeat with other contents is told apart."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()

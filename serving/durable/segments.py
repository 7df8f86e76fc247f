"""The segment files of a `dir:` store, and what opening it finds in them.

`recover` scans every segment (in any order: the cleaner copies live records forward) and
rebuilds where each session's live records are. Zeros after the last record (written ahead)
are cut off silently. A record cut short at the end of the last segment, the write a crash
interrupted and never acknowledged, is truncated away and reported; damaged bytes anywhere
else are skipped, and a session one of them names is marked unloadable.
Each finding is passed to `problem` as one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protos import journal_pb2
from serving.durable.base import record_session
from serving.durable.index import Entry, Location, resolve
from serving.durable.records import Damage, scan, whole_writes_end

PREFIX, SUFFIX = "wal-", ".log"


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{PREFIX}{segment:08d}{SUFFIX}"


def segment_numbers(directory: Path) -> list[int]:
    """The segments in `directory`, oldest first."""
    names = (p.name[len(PREFIX) : -len(SUFFIX)] for p in directory.glob(f"{PREFIX}*{SUFFIX}"))
    return sorted(int(name) for name in names if name.isdigit())


@dataclass
class Recovered:
    entries: dict[str, Entry]  # each session's live records
    sizes: dict[int, int]  # bytes of each segment
    live_bytes: dict[int, int]  # bytes of live records in each segment


def recover(directory: Path, problem: Callable[[str], None]) -> Recovered:
    found = segment_numbers(directory)
    recovered = Recovered({}, {}, {})
    records: dict[str, list[tuple[Location, journal_pb2.Record]]] = {}
    damaged: list[tuple[str, bytes]] = []  # what was lost, and its bytes
    for segment in found:
        path = segment_path(directory, segment)
        data = path.read_bytes()
        scanned = list(scan(data))
        # A segment written to last ends with the write a crash interrupted, if any: never
        # acknowledged, whichever of its pages reached the disk. Nothing after its last
        # whole write is kept (older segments, without `Written` records: whatever scans).
        # That is not always the last file: a new segment that could not be begun (a full
        # disk) may be left behind empty while writes went on in the one before, so every
        # segment is read this way (a sealed one ends with a whole write anyway).
        whole = whole_writes_end(data, scanned)
        if whole is not None and any(data[whole:]):
            cut = len(data.rstrip(b"\0")) - whole  # the zeros written ahead aside
            problem(
                f"{path.name}: the last {cut} bytes written are a write cut short "
                "(a crash interrupted it; it was never acknowledged): truncated"
            )
        size = 0  # where its records end: zeros written ahead may follow
        for item in scanned:
            if whole is not None and (item.start if isinstance(item, Damage) else item[0]) >= whole:
                break
            if isinstance(item, Damage):
                if item.end == len(data) and segment == found[-1]:
                    cut = len(data.rstrip(b"\0")) - item.start  # the zeros after it aside
                    problem(
                        f"{path.name}: the last {cut} bytes written are a record cut short "
                        f"(a write the crash interrupted): truncated ({item.why})"
                    )
                else:
                    where = f"{path.name} bytes {item.start}-{item.end}"
                    problem(f"{where} unreadable: {item.why}")
                    damaged.append((where, data[item.start : item.end]))
                    size = item.end
                continue
            offset, length, record = item
            size = offset + length
            if record.WhichOneof("record") == "written":  # a write's end: of no session
                continue
            try:
                session_id = record_session(record)
            except ValueError:
                problem(f"{path.name}: an empty record at byte {offset}")
                continue
            records.setdefault(session_id, []).append((Location(segment, offset, length), record))
        if size < len(data):  # a write cut short, or zeros written ahead: cut off
            truncate(path, size)
        recovered.sizes[segment] = size
        recovered.live_bytes[segment] = 0
    named = _ids_named(damaged)
    for session_id, items in records.items():
        entry = resolve(items)
        # A damaged record names its session: ids are 128 random bits, never matched by
        # chance. That session may have lost a step, so it is not served as it is.
        key = session_id.encode()
        hit = named.get(key) if SESSION_ID.fullmatch(key) else _named_in(key, damaged)
        if hit is not None and entry.deleted is None:
            entry.error = f"a record of it is damaged ({hit})"
        recovered.entries[session_id] = entry
        for location in entry.live():
            recovered.live_bytes[location.segment] += location.size
    return recovered


SESSION_ID = re.compile(rb"[0-9a-f]{32}")  # serving.sessions.new_session_id's form
_HEX_RUN = re.compile(rb"[0-9a-f]{32,}")


def _ids_named(damaged: list[tuple[str, bytes]]) -> dict[bytes, str]:
    """Every session id a damaged stretch may hold (each 32-character window of its runs of
    hex digits), with where it is: one pass over the damage, not one per session."""
    named: dict[bytes, str] = {}
    for where, data in damaged:
        for run in _HEX_RUN.finditer(data):
            for start in range(run.start(), run.end() - 31):
                named.setdefault(data[start : start + 32], where)
    return named


def _named_in(key: bytes, damaged: list[tuple[str, bytes]]) -> str | None:
    """Where a session id of another form appears in the damage, if it does."""
    return next((where for where, data in damaged if key in data), None)


def truncate(path: Path, size: int) -> None:
    """Cut a file to `size` bytes, durably: a crash right after must not bring back a torn
    write that a later segment now follows, where it would read as damage."""
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(descriptor, size)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_directory(path: Path) -> None:
    """fsync a directory, so that a file created or removed in it stays so after a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

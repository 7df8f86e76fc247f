"""The segment a `dir:` store writes to: one `fdatasync` per write, each write ended by a
`Written` record, zeros written ahead, and nothing left behind by a write that failed.

Zeros ahead: the file is written ahead with zeros (from 64 KiB, doubling to `ZEROED_AHEAD`
at a time), so that a write overwrites bytes the file already has and its `fdatasync`
flushes the data alone, where an append that grows the file also waits for the file
system's journal to record the new size (ext4, XFS; PostgreSQL zero-fills its WAL for the
same reason). Zeros after the last write mean "nothing written here yet".

Written records: a segment begins with one covering nothing (synced when it is made: it
marks the format), and every write ends with one holding where the write began and the
CRC-32 of its records' headers (each record's own CRC covers the rest), so a recovery knows
where the last whole write ends however the pages of the one after it reached the disk
(`serving.durable.records.whole_writes_end`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from serving.durable.records import end_of_write
from serving.durable.segments import segment_path, sync_directory

log = logging.getLogger("memserve.store")

ZEROED_AHEAD = 4 << 20  # the most zeros written ahead at once (from 64 KiB, doubling)
FIRST_ZEROS = 64 << 10
SEGMENT_START = end_of_write(0, [])  # what every segment begins with


class Appender:
    """Segment `number` of the store in `directory`, open for writing. Made new each time
    (a store's opening seals the segments before it)."""

    def __init__(self, directory: Path, number: int, segment_bytes: int) -> None:
        self.directory = directory
        self.number = number
        self.segment_bytes = segment_bytes
        path = segment_path(directory, number)
        self.file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(self.file, SEGMENT_START)
            os.fdatasync(self.file)
            sync_directory(directory)
        except OSError:
            os.close(self.file)
            with contextlib.suppress(OSError):  # writes go on in the segment before
                path.unlink()
            raise
        self.size = len(SEGMENT_START)  # where the last write ends
        self.zeroed = self.size  # bytes the file has (writes, then zeros)
        self.uncleared = 0  # where bytes of a failed write that could not be cleared end

    def write(self, frames: Sequence[bytes]) -> int:
        """Write `frames` after the last write, with the end of the write (`Written`), and
        fdatasync them; where they start. OSError if they are not all durable: then
        nothing of them is left for a recovery to find, or (if even that failed) nothing
        more is written until it is so (`clear_failed_write`)."""
        self.clear_failed_write()
        start = self.size
        data = b"".join([*frames, end_of_write(start, frames)])
        end = start + len(data)
        if end > self.zeroed:
            ahead = min(max(self.zeroed, FIRST_ZEROS), ZEROED_AHEAD)
            zeroed = max(end, min(self.zeroed + ahead, self.segment_bytes))
            try:
                if os.pwrite(self.file, bytes(zeroed - end), end) == zeroed - end:
                    self.zeroed = zeroed
            except OSError as error:  # a full disk may still take the records alone
                log.warning("could not write zeros ahead in %s: %s", self.directory, error)
        try:
            written = os.pwrite(self.file, data, start)
            if written != len(data):
                raise OSError(f"wrote {written} of {len(data)} bytes")
            os.fdatasync(self.file)
        except OSError:
            self.uncleared = max(self.uncleared, end)
            try:  # leave no partial record for the next write to follow: zeros again
                self.clear_failed_write()
            except OSError:  # the next write, and the probe, try again first
                log.exception("could not clear %s after a failed write", self.directory)
            raise
        self.size = end
        return start

    def clear_failed_write(self) -> None:
        """Zero (and fdatasync) what a failed write may have left after the last write, so
        that no later, shorter write leaves a stale record behind it for a recovery to
        find; until that succeeds nothing more is written (OSError)."""
        if self.uncleared <= self.size:
            return
        zeros = bytes(self.uncleared - self.size)
        if os.pwrite(self.file, zeros, self.size) != len(zeros):
            raise OSError(f"cleared only part of a failed write in {self.directory}")
        os.fdatasync(self.file)
        self.uncleared = 0

    def close(self) -> None:
        """Cut the zeros written ahead off and close the file."""
        try:
            os.ftruncate(self.file, self.size)
        except OSError:  # harmless: opening reads zeros after the last write as its end
            log.exception("could not cut the zeros off %s", self.directory)
        os.close(self.file)

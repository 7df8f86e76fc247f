"""`dir:PATH`: a session store in a local directory, as segment files of framed records.

Every commit appends its records to the active segment (`wal-00000001.log`, ...) in one
write, one `fdatasync`, whatever the number of sessions in it (`serving.durable.appender`:
zeros written ahead, each write ended by a record of its extent and CRC); a segment past
`segment_bytes` is sealed and a new one begun.

Opening the directory scans every segment and rebuilds an index of where each session's live
records are: its creation, its latest snapshot, the calls after that snapshot. The scan does
not depend on the order records were written in, so the cleaner may copy live records
forward: a sealed segment whose live share falls under half is copied into the active one
and deleted, one per commit at most.

What a crash can leave, and what opening does with it:
- zeros after the last write (written ahead): cut off, nothing to report;
- a write cut short at the end of the last segment (never acknowledged), whichever of its
  pages reached the disk: the file is truncated before it, and the truncation reported;
- damaged bytes anywhere else (a flipped bit): the records they held are skipped and
  reported; a session that loses one becomes unloadable with DATA_LOSS naming the steps it
  misses, and the rest of the store is served.
One server per directory: a lock file refuses a second.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from protos import journal_pb2
from serving.durable.appender import Appender
from serving.durable.base import (
    RESPONSES_KEPT,
    SessionStore,
    SessionSummary,
    StoredSession,
    StoreUnavailable,
    record_session,
)
from serving.durable.index import Entry, Location, without_state
from serving.durable.records import CorruptRecordError, frame, read_frame
from serving.durable.segments import recover, segment_path, sync_directory
from serving.errors import DataLoss

log = logging.getLogger("memserve.store")

SEGMENT_BYTES = 64 << 20


class DirectorySessionStore(SessionStore):
    """Sessions' records in segment files under one directory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        segment_bytes: int = SEGMENT_BYTES,
        responses: int = RESPONSES_KEPT,
    ) -> None:
        self.path = Path(path)
        self.segment_bytes = segment_bytes
        self.responses = responses
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "LOCK", "a+")  # noqa: SIM115 - held while open
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock.close()
            raise ValueError(f"{self.path} is in use by another memserve server") from error
        try:
            self._problems: list[str] = []
            found = recover(self.path, self._problem)
            self.entries: dict[str, Entry] = found.entries
            self.sizes: dict[int, int] = found.sizes  # bytes of each segment
            self.live_bytes: dict[int, int] = found.live_bytes  # bytes of live records in each
            self._begin(Appender(self.path, max(self.sizes, default=0) + 1, segment_bytes))
        except BaseException:
            self._lock.close()  # not held until this half-made store is collected
            raise

    # ------------------------------------------------------------------ reading

    def _segment_path(self, segment: int) -> Path:
        return segment_path(self.path, segment)

    def _read(self, location: Location) -> journal_pb2.Record:
        with open(self._segment_path(location.segment), "rb") as handle:
            data = os.pread(handle.fileno(), location.size, location.offset)
        record, _ = read_frame(data, 0)
        return record

    def sessions(self) -> list[SessionSummary]:
        return [
            self._summary(session_id, entry)
            for session_id, entry in self.entries.items()
            if entry.deleted is None
        ]

    def summary(self, session_id: str) -> SessionSummary | None:
        entry = self.entries.get(session_id)
        if entry is None or entry.deleted is not None:
            return None
        return self._summary(session_id, entry)

    @staticmethod
    def _summary(session_id: str, entry: Entry) -> SessionSummary:
        created = entry.summary
        return SessionSummary(
            session_id=session_id,
            model=created.model if created else "",
            weights_digest=created.weights_digest if created else "",
            ttl=created.ttl_seconds if created else 0.0,
            seed=created.seed if created and created.HasField("seed") else None,
            step=entry.step,
            error=entry.error,
            request_id=created.request_id if created else "",
            request_digest=created.request_digest if created else b"",
            made=created.unix_time if created else 0.0,
            tenant=created.tenant if created else "",
        )

    def load(self, session_id: str) -> StoredSession:
        entry = self.entries.get(session_id)
        if entry is None or entry.deleted is not None:
            raise KeyError(session_id)
        if entry.error is not None or entry.created is None:
            raise DataLoss(f"session {session_id} cannot be restored: {entry.error}")
        try:
            created = self._read(entry.created).created
            snapshot = self._read(entry.snapshot).snapshot if entry.snapshot else None
            calls = [self._read(at).call for _, (at, _) in sorted(entry.calls.items())]
        except (CorruptRecordError, OSError) as error:
            raise DataLoss(f"session {session_id} cannot be restored: {error}") from error
        responses = list(snapshot.responses) if snapshot is not None else []
        responses += [call.response for call in calls if call.HasField("response")]
        return StoredSession(
            created=created,
            step=entry.step,
            snapshot=snapshot,
            calls=calls,
            responses=responses[-self.responses :],
        )

    def problems(self) -> list[str]:
        return list(self._problems)

    def _problem(self, text: str) -> None:
        self._problems.append(text)
        log.warning(
            "store damage: %s", text, extra={"event": "store_damage", "path": str(self.path)}
        )

    # ------------------------------------------------------------------ writing

    @property
    def active(self) -> int:
        """The number of the segment written to."""
        return self.appender.number

    def _roll(self) -> None:
        """Seal the active segment and go on in a new one. If the new one cannot be made
        (no inode, too many open files), the records just written are durable all the
        same: this segment goes on growing, and the next write tries again."""
        try:
            appender = Appender(self.path, self.active + 1, self.segment_bytes)
        except OSError as error:
            log.warning("cannot start a new segment in %s: %s", self.path, error)
            return
        self.appender.close()
        self._begin(appender)

    def _begin(self, appender: Appender) -> None:
        self.appender = appender
        self.sizes[appender.number] = appender.size
        self.live_bytes.setdefault(appender.number, 0)

    def _write(self, frames: Sequence[bytes]) -> int:
        """Write `frames` to the active segment, durably; where they start."""
        start = self.appender.write(frames)
        self.sizes[self.active] = self.appender.size
        return start

    def commit(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        refused: set[str] = set()
        accepted: list[tuple[journal_pb2.Record, bytes]] = []
        steps: dict[str, int] = {}  # committed steps as this batch advances them
        for record in records:
            session_id = record_session(record)
            entry = self.entries.get(session_id)
            known = entry is not None and entry.deleted is None
            step = steps.get(session_id, entry.step if entry is not None else 0)
            kind = record.WhichOneof("record")
            if kind == "created":
                ok = entry is None and session_id not in steps
                step = record.created.step
            elif kind == "call":
                ok = (known or session_id in steps) and record.call.from_step == step
                step = record.call.to_step
            elif kind == "snapshot":  # never behind the latest; ahead only without calls
                latest = entry.snapshot_step if entry is not None else -1
                ok = (known or session_id in steps) and record.snapshot.step >= latest
                step = max(step, record.snapshot.step)
            else:
                ok = known or session_id in steps
            if not ok or session_id in refused:
                refused.add(session_id)
                continue
            steps[session_id] = step
            accepted.append((record, frame(record)))
        if accepted:
            self._append(accepted)
        self._clean_one()
        return refused

    def _append(self, accepted: list[tuple[journal_pb2.Record, bytes]]) -> None:
        try:
            offset = self._write([framed for _, framed in accepted])
        except OSError as error:
            raise StoreUnavailable(
                f"cannot write the session store {self.path}: {error}"
            ) from error
        for record, framed in accepted:
            self._index(record, Location(self.active, offset, len(framed)))
            offset += len(framed)
        if offset >= self.segment_bytes:
            self._roll()

    def _index(self, record: journal_pb2.Record, location: Location) -> None:
        session_id = record_session(record)
        kind = record.WhichOneof("record")
        entry = self.entries.setdefault(session_id, Entry())
        if kind == "call":  # from the committed step (`commit`): it only adds a live record
            entry.segments.add(location.segment)
            entry.calls[record.call.from_step] = (location, record.call.to_step)
            entry.step = record.call.to_step
            self.live_bytes[location.segment] += location.size
            return
        before = entry.live()  # every call since the snapshot: O(calls), not per call
        entry.segments.add(location.segment)
        if kind == "created":
            entry.created, entry.summary = location, without_state(record.created)
            entry.step = record.created.step
        elif kind == "snapshot":
            entry.snapshot, entry.snapshot_step = location, record.snapshot.step
            entry.calls = {s: c for s, c in entry.calls.items() if c[1] > record.snapshot.step}
            entry.step = max(entry.step, record.snapshot.step)
        elif kind == "deleted":
            entry.deleted = location
        self._account(before, entry.live())

    def _account(self, before: list[Location], after: list[Location]) -> None:
        for location in set(before) - set(after):
            self.live_bytes[location.segment] -= location.size
        for location in set(after) - set(before):
            self.live_bytes[location.segment] += location.size

    def _clean_one(self) -> None:
        """Copy the live records of the emptiest sealed segment forward, then delete it, if
        less than half of it is live. A failure leaves both copies (a scan keeps one)."""
        sealed = [s for s in self.sizes if s != self.active and self.sizes[s] > 0]
        if not sealed:
            return
        segment = min(sealed, key=lambda s: self.live_bytes[s] / self.sizes[s])
        if self.live_bytes[segment] * 2 > self.sizes[segment]:
            return
        try:
            moves = [
                (entry, location, self._compacted(entry, self._read(location)))
                for entry in self.entries.values()
                for location in entry.live()
                if location.segment == segment
            ]
            if moves:
                frames = [frame(record) for _, _, record in moves]
                offset = self._write(frames)
                for (entry, old, _), framed in zip(moves, frames, strict=True):
                    self._relocate(entry, old, Location(self.active, offset, len(framed)))
                    offset += len(framed)
            self._forget_segment(segment)
        except (OSError, CorruptRecordError):
            log.exception("cleaning %s failed", self._segment_path(segment).name,
                          extra={"event": "store_error", "path": str(self.path)})  # fmt: skip

    @staticmethod
    def _compacted(entry: Entry, record: journal_pb2.Record) -> journal_pb2.Record:
        """A record as copied forward: a creation's state is dropped once a snapshot exists."""
        if record.WhichOneof("record") == "created" and entry.snapshot is not None:
            record.created.ClearField("state")
        return record

    def _relocate(self, entry: Entry, old: Location, new: Location) -> None:
        before = entry.live()
        entry.segments.add(new.segment)
        if entry.created == old:
            entry.created = new
        elif entry.snapshot == old:
            entry.snapshot = new
        elif entry.deleted == old:
            entry.deleted = new
        else:
            entry.calls = {
                start: ((new, to) if at == old else (at, to))
                for start, (at, to) in entry.calls.items()
            }
        self._account(before, entry.live())

    def _forget_segment(self, segment: int) -> None:
        self._segment_path(segment).unlink()
        sync_directory(self.path)
        del self.sizes[segment], self.live_bytes[segment]
        for session_id in list(self.entries):
            entry = self.entries[session_id]
            before = entry.live()
            entry.segments.discard(segment)
            if entry.deleted is not None and entry.segments <= {entry.deleted.segment}:
                self._account(before, [])  # nothing of it is left that a scan could misread
                del self.entries[session_id]

    def probe(self) -> None:
        probe = self.path / "PROBE"
        try:
            self.appender.clear_failed_write()
            descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(descriptor, b"probe")
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)
            probe.unlink()
        except OSError as error:
            raise StoreUnavailable(
                f"cannot write the session store {self.path}: {error}"
            ) from error

    def close(self) -> None:
        self.appender.close()
        self._lock.close()

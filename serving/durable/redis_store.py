"""`redis://HOST:PORT/DB`: a session store in Redis, one round trip per commit.

Per session (keys share the hash tag `{id}`): `meta` (a hash: committed `step`, `snap`, the
step of its snapshot, and `summary`, what a server needs at start), `created` (the framed
creation record), `snap` (the framed latest snapshot), `calls` and `ends` (the framed calls
after the snapshot and their last steps, in order); `sessions` is the set of live ids. A
commit is ONE `EVALSHA` of a script that checks every call's first step against the
committed one and applies the batch's records in order, so no other server can interleave.
Durability is Redis's: run it with `appendonly yes` and `appendfsync always` for
`--durability launch` to mean what it says (docs/serving.md).

Values are the same framed records as in `dir:` (length and CRC-32), so a damaged value is
found on load and reported as DATA_LOSS for its session only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis
from redis.exceptions import RedisError

from protos import journal_pb2
from serving.durable.base import (
    RESPONSES_KEPT,
    SessionStore,
    SessionSummary,
    StoredSession,
    StoreUnavailable,
    record_session,
)
from serving.durable.records import CorruptRecordError, frame, unframe
from serving.durable.redis_loop import RedisLoopConnection
from serving.errors import DataLoss

PREFIX = "memserve:"

# For a cluster's replicas, every record written refreshes the session's keys' expiry to its
# TTL, and so do a claim and a touch (by a replica serving a session nothing has written for
# half its TTL: serving/persistence.py, `keep_alive`): a session that is not used for its
# TTL expires in Redis, for every replica at once (they only forget idle sessions). A lone
# server deletes the sessions it expires itself, so their keys get no expiry: with
# `--durability park` nothing is written while a session is in use, and Redis would end it
# under its caller.
REFRESH = """
local function refresh(key)
  local ttl = tonumber(redis.call('HGET', key .. 'meta', 'ttl'))
  if ttl and ttl > 0 then
    for _, name in ipairs({'meta', 'created', 'snap', 'calls', 'ends'}) do
      redis.call('PEXPIRE', key .. name, ttl)
    end
  end
end
"""

# ARGV: prefix, then per record: kind, session id, a, b, c, framed record. created: a = its
# step, b = its summary, c = its TTL in ms (0: none); call: a = from, b = to; snapshot: a =
# its step.
COMMIT = (
    REFRESH
    + """
local prefix, replica = ARGV[1], ARGV[2]
local refused, bad = {}, {}
for i = 3, #ARGV, 6 do
  local kind, id, a, b, c = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local record = ARGV[i + 5]
  local key = prefix .. '{' .. id .. '}:'
  local ok = not bad[id]
  local exists = redis.call('EXISTS', key .. 'meta') == 1
  if ok and kind == 'created' then
    ok = not exists
    if ok then
      redis.call('SET', key .. 'created', record)
      redis.call('HSET', key .. 'meta', 'step', a, 'snap', -1, 'summary', b, 'ttl', c)
      redis.call('SADD', prefix .. 'sessions', id)
    end
  elseif ok and kind == 'call' then
    ok = exists and redis.call('HGET', key .. 'meta', 'step') == a
    if ok then
      redis.call('RPUSH', key .. 'calls', record)
      redis.call('RPUSH', key .. 'ends', b)
      redis.call('HSET', key .. 'meta', 'step', b)
    end
  elseif ok and kind == 'snapshot' then
    -- only from the owner (the last to commit or claim): a replica whose call was refused
    -- holds a state the store never took, and must not write it in whole either
    ok = exists and tonumber(redis.call('HGET', key .. 'meta', 'snap')) <= tonumber(a)
      and (redis.call('HGET', key .. 'meta', 'owner') or '') == replica
    if ok then
      while true do
        local first = redis.call('LINDEX', key .. 'ends', 0)
        if not first or tonumber(first) > tonumber(a) then break end
        redis.call('LPOP', key .. 'ends')
        redis.call('LPOP', key .. 'calls')
      end
      redis.call('SET', key .. 'snap', record)
      local step = tonumber(redis.call('HGET', key .. 'meta', 'step'))
      redis.call('HSET', key .. 'meta', 'snap', a, 'step', math.max(step, tonumber(a)))
    end
  elseif ok and kind == 'deleted' then
    ok = exists
    if ok then
      redis.call('DEL', key .. 'meta', key .. 'created', key .. 'snap', key .. 'calls',
                 key .. 'ends')
      redis.call('SREM', prefix .. 'sessions', id)
    end
  end
  if ok and kind ~= 'deleted' then
    refresh(key)
    redis.call('HSET', key .. 'meta', 'owner', replica)
  end
  if not ok and not bad[id] then
    bad[id] = true
    refused[#refused + 1] = id
  end
end
return refused
"""
)


# ARGV: prefix, then the ids of the sessions whose expiry to restart.
TOUCH = (
    REFRESH
    + """
for i = 2, #ARGV do
  refresh(ARGV[1] .. '{' .. ARGV[i] .. '}:')
end
"""
)

# KEYS[1]: the session's meta key. The claimer serves the session from now on: its expiry
# restarts as at a write.
CLAIM = (
    REFRESH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
refresh(string.sub(KEYS[1], 1, #KEYS[1] - #'meta'))
return redis.call('HGET', KEYS[1], 'step')
"""
)


class RedisSessionStore(SessionStore):
    """Sessions' records in a Redis server (not Redis Cluster: a commit spans sessions),
    which several memserve replicas may share."""

    shared = True

    def __init__(
        self,
        url: str,
        prefix: str = PREFIX,
        responses: int = RESPONSES_KEPT,
        timeout: float = 5.0,
        replica: str = "",
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.replica = replica  # who commits: the owner every write records
        self.responses = responses
        try:
            self.redis = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError as error:
            raise ValueError(f"--store {url!r} is not a Redis URL: {error}") from error
        self.commit_script = self.redis.register_script(COMMIT)
        self.claim_script = self.redis.register_script(CLAIM)
        self.touch_script = self.redis.register_script(TOUCH)
        self.timeout = timeout
        # Commits go from the event loop (serving/durable/redis_loop.py) except over TLS,
        # which that connection does not speak: those stay in the committer's thread.
        self.commits_on_loop = not issubclass(
            self.redis.connection_pool.connection_class, redis.connection.SSLConnection
        )
        self._loop_connection: RedisLoopConnection | None = None

    def _unreachable(self, error: RedisError) -> StoreUnavailable:
        return StoreUnavailable.unusable(self.url, error)

    def _key(self, session_id: str, name: str) -> str:
        return f"{self.prefix}{{{session_id}}}:{name}"

    def probe(self) -> None:
        """StoreUnavailable unless Redis answers."""
        try:
            self.redis.ping()
        except RedisError as error:
            raise self._unreachable(error) from error

    def sessions(self) -> list[SessionSummary]:
        try:
            members = self.redis.smembers(self.prefix + "sessions")
            ids = sorted(_text(member) for member in members)
            pipe = self.redis.pipeline(transaction=False)
            for session_id in ids:
                pipe.hgetall(self._key(session_id, "meta"))
            metas: list[dict[bytes, bytes]] = pipe.execute()
            expired = [session_id for session_id, meta in zip(ids, metas, strict=True) if not meta]
            if expired:  # their keys expired (TTL): forget them in the set too
                self.redis.srem(self.prefix + "sessions", *expired)
        except RedisError as error:
            raise self._unreachable(error) from error
        return [_summary(i, meta) for i, meta in zip(ids, metas, strict=True) if meta]

    def summary(self, session_id: str) -> SessionSummary | None:
        try:
            meta = cast(dict[bytes, bytes], self.redis.hgetall(self._key(session_id, "meta")))
        except RedisError as error:
            raise self._unreachable(error) from error
        return _summary(session_id, meta) if meta else None

    def committed_step(self, session_id: str) -> int | None:
        try:
            step = self.redis.hget(self._key(session_id, "meta"), "step")
        except RedisError as error:
            raise self._unreachable(error) from error
        return None if step is None else int(step)

    def owner(self, session_id: str) -> tuple[int, str] | None:
        """The session's committed step and the replica that last committed or claimed it
        (None if the store does not hold it)."""
        try:
            step, owner = self.redis.hmget(self._key(session_id, "meta"), ["step", "owner"])
        except RedisError as error:
            raise self._unreachable(error) from error
        return None if step is None else (int(step), _text(owner or b""))

    def claim(self, session_id: str) -> int | None:
        """Record this replica as the session's owner (it just loaded it); its committed
        step, or None if the store does not hold it."""
        try:
            step = self.claim_script(keys=[self._key(session_id, "meta")], args=[self.replica])
        except RedisError as error:
            raise self._unreachable(error) from error
        return None if step is None else int(step)

    def touch(self, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        try:
            self.touch_script(args=[self.prefix, *session_ids])
        except RedisError as error:
            raise self._unreachable(error) from error

    def load(self, session_id: str) -> StoredSession:
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.get(self._key(session_id, "created"))
            pipe.get(self._key(session_id, "snap"))
            pipe.lrange(self._key(session_id, "calls"), 0, -1)
            pipe.hget(self._key(session_id, "meta"), "step")
            created, snap, calls, step = pipe.execute()
        except RedisError as error:
            raise self._unreachable(error) from error
        if created is None:
            raise KeyError(session_id)
        try:
            creation = unframe(created).created
            snapshot = unframe(snap).snapshot if snap is not None else None
            records = [unframe(data).call for data in calls]
        except CorruptRecordError as damage:
            raise DataLoss(f"session {session_id} cannot be restored: {damage}") from damage
        at = max(snapshot.step if snapshot is not None else -1, creation.step)
        for record in records:
            if record.from_step != at:
                raise DataLoss(
                    f"session {session_id} cannot be restored: the store is missing its steps "
                    f"{at} to {record.from_step}"
                )
            at = record.to_step
        if step is None or int(step) != at:
            raise DataLoss(
                f"session {session_id} cannot be restored: its records end at step {at} but "
                f"its committed step is {step!r}"
            )
        responses = list(snapshot.responses) if snapshot is not None else []
        responses += [record.response for record in records if record.HasField("response")]
        return StoredSession(creation, at, snapshot, records, responses[-self.responses :])

    def commit(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        if not records:
            return set()
        try:
            refused = self.commit_script(args=self._commit_arguments(records))
        except RedisError as error:
            raise self._unreachable(error) from error
        return {_text(member) for member in refused}

    async def commit_on_loop(self, records: Sequence[journal_pb2.Record]) -> set[str]:
        """The same script as `commit`, sent on a connection the event loop drives."""
        if not records:
            return set()
        if any(record.WhichOneof("record") == "snapshot" for record in records):
            # whole states (up to hundreds of KB each, every session at a drain): framed
            # in a thread, not on the loop; a launch's calls are a few hundred bytes each
            loop = asyncio.get_running_loop()
            arguments = await loop.run_in_executor(None, self._commit_arguments, records)
        else:
            arguments = self._commit_arguments(records)
        connection = await self._connected()
        sha = self.commit_script.sha
        reply = await connection.command(self.timeout, "EVALSHA", sha, 0, *arguments)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted and forgot the script (scripts are not persisted): nothing ran
            reply = await connection.checked(self.timeout, "EVAL", COMMIT, 0, *arguments)
        elif isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailable.unusable(self.url, reply)
        return {_text(member) for member in reply}

    async def probe_on_loop(self) -> None:
        """StoreUnavailable unless Redis answers on the connection commits take (opened
        anew, with its AUTH and SELECT, when a failure dropped it: the pooled connection of
        `probe` may be fine while new ones are refused)."""
        await (await self._connected()).checked(self.timeout, "PING")

    async def _connected(self) -> RedisLoopConnection:
        connection = self._loop_connection
        if connection is None or connection.lost is not None:
            connection = self._loop_connection = await RedisLoopConnection.open(
                self.url, self.redis.connection_pool.connection_kwargs, self.timeout
            )
        return connection

    def _commit_arguments(self, records: Sequence[journal_pb2.Record]) -> list[Any]:
        """The commit script's ARGV for `records` (see COMMIT)."""
        arguments: list[Any] = [self.prefix, self.replica]
        for record in records:
            kind = record.WhichOneof("record")
            a: Any = ""
            b: Any = ""
            c: Any = ""
            if kind == "created":
                created = record.created
                a = created.step
                c = max(1, round(created.ttl_seconds * 1000)) if self.replica else 0
                b = json.dumps(
                    {
                        "model": created.model,
                        "weights_digest": created.weights_digest,
                        "ttl": created.ttl_seconds,
                        "seed": created.seed if created.HasField("seed") else None,
                        "request_id": created.request_id,
                        "request_digest": created.request_digest.hex(),
                        "made": created.unix_time,
                        "tenant": created.tenant,
                    }
                )
            elif kind == "call":
                a, b = record.call.from_step, record.call.to_step
            elif kind == "snapshot":
                a = record.snapshot.step
            arguments += [kind, record_session(record), str(a), str(b), str(c), frame(record)]
        return arguments

    def close(self) -> None:
        if self._loop_connection is not None:
            self._loop_connection.close()
        self.redis.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _summary(session_id: str, meta: dict[bytes, bytes]) -> SessionSummary:
    """A session's summary from its `meta` hash (an error in it if the hash is damaged)."""
    problem = None
    try:
        summary: dict[str, Any] = json.loads(meta[b"summary"])
        step = int(meta[b"step"])
    except (KeyError, ValueError) as damage:
        summary, step, problem = {}, 0, f"its summary is damaged: {damage}"
    return SessionSummary(
        session_id=session_id,
        model=summary.get("model", ""),
        weights_digest=summary.get("weights_digest", ""),
        ttl=float(summary.get("ttl", 0.0)),
        seed=summary.get("seed"),
        step=step,
        error=problem,
        request_id=summary.get("request_id", ""),
        request_digest=bytes.fromhex(summary.get("request_digest", "")),
        made=float(summary.get("made", 0.0)),
        tenant=summary.get("tenant", ""),
    )

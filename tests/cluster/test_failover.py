"""Replicas killed and frozen under load, through Envoy.

- `kill -9` one replica of three, several times, at random moments (from a seeded RNG: the
  seed is printed, and MEMSERVE_FAILOVER_SEED runs the same kills again) while clients
  record every acknowledged call; the supervisor starts the replica again. Every session
  stays usable, the acknowledged calls replayed in order on a lone server answer the same
  bit for bit (none lost, none doubled: tests/serving's oracle), and the sessions of the
  dead replica are answered again within 2 s (p99) of the kill (their first answer to a
  call sent after it: a retry of a call cut off, or the call after an answer on its way).
- A frozen replica (SIGSTOP) whose session another takes over has its stale commit refused
  when it is continued, drops its copy and doubles nothing."""

from __future__ import annotations

import os
import random
import signal
import time
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest

from bench.child_cluster import Cluster, session_metadata
from bench.child_server import ServerProcess
from protos import memserve_pb2
from serving.wire import decode, encode
from tests.cluster.conftest import CHAT
from tests.cluster.load import Load, check, new_id, percentile
from tests.serving import oracle
from tests.serving.client import metric, scrape

KILLS = 3
FAILOVER_SECONDS = 2.0  # the bound on the p99 pause of a dead replica's sessions


def seed_from_environment() -> int:
    given = os.environ.get("MEMSERVE_FAILOVER_SEED")
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"\nfailover seed {seed} (MEMSERVE_FAILOVER_SEED={seed} to run these kills again)")
    return seed


def test_kill_9_under_load_loses_nothing_and_fails_over_within_2_s(
    healthy: Cluster, reference: ServerProcess
) -> None:
    seed = seed_from_environment()
    chooser = random.Random(seed)
    load = Load(healthy, ["ntm-copy"] * 4 + [CHAT] * 2, seed=seed)
    table = healthy.table()
    pauses: list[float] = []
    kills: list[str] = []
    try:
        load.start()
        for _ in range(KILLS):
            healthy.healthy(3)
            load.settled()  # every session answered on its own replica again
            time.sleep(chooser.uniform(0.0, 1.0))  # a random moment of the steady load
            owners = sorted({table.replica_of(c.session) for c in load.clients})
            victim = chooser.choice(owners)
            owned = [c for c in load.clients if table.replica_of(c.session) == victim]
            killed_at = time.monotonic()
            pid = healthy.signal(victim, signal.SIGKILL)
            kills.append(victim)
            # its sessions' next answers, from the replicas Envoy now routes them to
            pauses += [load.answered_again(c, killed_at) - killed_at for c in owned]
            healthy.wait_for(partial(_restarted, name=victim, old_pid=pid), 120, "a restart")
        healthy.healthy(3)
        load.settled()  # all usable again, back on their own replicas
    finally:
        load.stop()
    check(load, reference, healthy)
    p50, p99 = percentile(pauses, 0.5), percentile(pauses, 0.99)
    edge = healthy.envoy_stats("ejections_enforced_total", "upstream_rq_retry_success")
    print(f"killed {kills}; failover pauses (s) {sorted(round(p, 3) for p in pauses)}: "
          f"p50 {p50:.3f}, p99 {p99:.3f}; calls sent again {sum(c.retries for c in load.clients)} "
          f"after {sorted({x for c in load.clients for x in c.codes})}; Envoy {edge}")  # fmt: skip
    assert sum(c.retries for c in load.clients) >= 1  # the kills cut calls off
    assert p99 < FAILOVER_SECONDS, (
        f"seed {seed}: the sessions of a killed replica waited {p99:.2f} s (p99) for an "
        f"answer: {sorted(pauses)}"
    )


def _restarted(state: dict[str, Any], name: str, old_pid: int) -> bool:
    process = next(p for p in state["processes"] if p["name"] == name)
    return bool(process["pid"] != old_pid and process["health"] == "serving")


def test_a_frozen_replica_loses_its_session_and_nothing_is_doubled(
    healthy: Cluster, reference: ServerProcess
) -> None:
    """The session's replica is frozen (SIGSTOP) with a call of it in progress; Envoy takes
    the replica out (its health checks time out), the client's retry of the call lands on
    another, which brings the session back from the store and runs it; the frozen replica,
    continued, finishes the call but its commit is refused, and it drops its copy. The
    session took the call once."""
    envoy, ref, rng = healthy.stub(), reference.stub(), np.random.default_rng()
    table = healthy.table()
    session = envoy.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    twin = ref.CreateSession(memserve_pb2.CreateSessionRequest(model="ntm-copy")).session_id
    metadata = session_metadata(session)
    owner = table.replica_of(session)
    first = rng.random((3, 9), dtype=np.float32)
    oracle.step(envoy, session, first, new_id(), metadata)
    oracle.step(ref, twin, first)
    since = healthy.log_sizes()[owner]
    loaded = [e for e in healthy.replica_events(owner) if e.get("event") == "model_loaded"]
    worker = int([e for e in loaded if e["model"] == "ntm-copy"][-1]["pid"])
    inputs, request_id = rng.random((4, 9), dtype=np.float32), new_id()
    os.kill(worker, signal.SIGSTOP)  # the call cannot finish on its replica
    try:
        held = envoy.Step.future(
            memserve_pb2.StepRequest(session_id=session, inputs=encode(inputs),
                                     request_id=request_id),
            metadata=metadata,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while metric(scrape(healthy.metrics_url(owner)), "memserve_queue_length") < 1:
            assert time.monotonic() < deadline, "the call never reached its replica's engine"
            time.sleep(0.01)
        healthy.signal(owner, signal.SIGSTOP)  # and the replica is frozen, as in a long pause
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        healthy.wait_for(lambda s: not _in_ring(s, owner), 30, f"{owner} out of Envoy's routing")
        taken = oracle.step(envoy, session, inputs, request_id, metadata)  # the retry, elsewhere
    finally:
        healthy.signal(owner, signal.SIGCONT)
    expected = oracle.step(ref, twin, inputs)
    assert taken.step == expected.step == 7
    assert np.array_equal(decode(taken.outputs, "o"), decode(expected.outputs, "o"))
    with pytest.raises(grpc.RpcError) as stale:  # its commit is refused: it answers so
        held.result(timeout=60)
    assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused" in (stale.value.details() or "")
    # It answered first, then drops its copy (under the engine's lock): wait for the line.
    healthy.wait_for_event(
        owner, since,
        lambda e: e.get("event") == "session_unloaded" and e["session"] == session,
        "drop of the stale copy",
    )  # fmt: skip
    healthy.healthy(3)  # back in Envoy's routing: the session's calls go to it again
    again = oracle.step(envoy, session, inputs, request_id, metadata)  # a repeat: the 1st answer
    assert again == taken
    mine, theirs = oracle.state_of(envoy, session, metadata), oracle.state_of(ref, twin)
    assert mine[0] == theirs[0] == 7 and oracle.same_state(mine[1], theirs[1])


def _in_ring(state: dict[str, Any], name: str) -> bool:
    return bool(next(p for p in state["processes"] if p["name"] == name).get("in_ring"))

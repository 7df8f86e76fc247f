"""Scaling a running cluster from 2 replicas to 3 and back under load: no acknowledged step
lost or doubled (tests/serving's oracle), and the sessions that moved, counted from the
replicas' logs (each brought back once by its new replica), are those Envoy's Maglev table
moves, about 1/3 of them, as `memserve cluster scale` reports."""

from __future__ import annotations

import re
from typing import Any

import grpc
import numpy as np

from bench.child_cluster import Cluster, session_metadata
from bench.child_server import ServerProcess
from protos import memserve_pb2
from tests.cluster.conftest import CHAT
from tests.cluster.load import Load, check, new_id
from tests.serving import oracle

IDLE = 45  # sessions stepped once before and once after each change (with the load's)


def scale(cluster: Cluster, replicas: int) -> tuple[int, int]:
    """`memserve cluster scale N`; (moved, sessions) as it reports them."""
    done = cluster.command_line("scale", str(replicas))
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"(\d+) of (\d+) sessions moved", done.stdout)
    assert found is not None, done.stdout
    cluster.healthy(replicas)
    return int(found[1]), int(found[2])


def touch(cluster: Cluster, sessions: list[str]) -> None:
    """One Step of each session through Envoy, as a client makes it: sent again with its
    request id after UNAVAILABLE (a replica that held a copy the session has since left
    runs the call, is refused by the store, drops the copy and brings the session back)."""
    stub, inputs = cluster.stub(), np.full((1, 9), 0.25, np.float32)
    for session in sessions:
        request_id = new_id()
        for _ in range(5):
            try:
                oracle.step(stub, session, inputs, request_id, session_metadata(session))
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        else:
            raise AssertionError(f"session {session} was not answered in 5 tries")


def loaded(cluster: Cluster, since: dict[str, int]) -> dict[str, set[str]]:
    """The sessions each replica brought back from the store since the log offsets `since`."""
    found = {}
    for name in cluster.replica_names(cluster.state()):
        events = cluster.replica_events(name, since.get(name, 0))
        found[name] = {e["session"] for e in events if e.get("event") == "session_loaded"}
    return found


def history(cluster: Cluster, sessions: set[str], old: Any, new: Any) -> dict[str, Any]:
    """What each replica's log says of `sessions` (for a failure's message)."""
    told: dict[str, Any] = {}
    for session in sorted(sessions)[:4]:
        events = [(name, e["time"][11:23], e["event"], e.get("step"))
                  for name in ("r1", "r2", "r3") for e in cluster.replica_events(name)
                  if e.get("session") == session]  # fmt: skip
        told[session] = (old.replica_of(session), new.replica_of(session), sorted(events))
    return told


def test_scale_from_2_to_3_and_back_under_load(healthy: Cluster, reference: ServerProcess) -> None:
    scale(healthy, 2)
    create = memserve_pb2.CreateSessionRequest(model="ntm-copy")
    idle = [healthy.stub().CreateSession(create).session_id for _ in range(IDLE)]
    touch(healthy, idle)  # each now lives on its replica of two
    load = Load(healthy, ["ntm-copy"] * 3 + [CHAT]).start()
    sessions = idle + [c.session for c in load.clients]
    report = []
    try:
        load.settled()
        for replicas in (3, 2):
            old, since = healthy.table(), healthy.log_sizes()
            moved_said, total = scale(healthy, replicas)
            new = healthy.table()
            touch(healthy, idle)
            load.settled()
            # and again: a call that reached no replica (a new one's first connection) is
            # sent by Envoy to another, which may be the session's old one
            touch(healthy, idle)
            expected = {s for s in sessions if old.replica_of(s) != new.replica_of(s)}
            brought = loaded(healthy, since)
            moved = set().union(*brought.values()) & set(sessions)
            # each that moved was brought back by its new replica; nothing else was
            assert moved == expected, (replicas, history(healthy, moved ^ expected, old, new))
            assert all(new.replica_of(s) == r for r, ss in brought.items() for s in ss & moved)
            fraction = len(moved) / len(sessions)
            report.append(
                f"{5 - replicas} -> {replicas}: {len(moved)} of {len(sessions)} sessions moved "
                f"({fraction:.0%}; `scale` said {moved_said} of {total})"
            )
            print(healthy.envoy_stats("upstream_rq_retry", "ejections_enforced_total"))
            assert 0.15 < fraction < 0.55, report  # about 1/3: 1/N of N = 3
            assert moved_said <= total and abs(moved_said / total - 1 / 3) < 0.2, report
    finally:
        load.stop()
    print("\n" + "; ".join(report))
    check(load, reference, healthy)

"""Scaling a running cluster from 2 replicas to 3 and back under load: no acknowledged step
lost or doubled (tests/serving's oracle), and the sessions that moved, counted from the
replicas' logs (each brought back once by its new replica), are those Envoy's Maglev table
moves, about 1/3 of them, as `memserve cluster scale` reports."""

from __future__ import annotations

import re
import time

import grpc
import numpy as np

from bench.child_cluster import Cluster, session_metadata
from bench.child_server import ServerProcess
from memserve.cluster.maglev import Maglev
from protos import memserve_pb2
from tests.cluster.conftest import CHAT
from tests.cluster.load import Load, check, new_id
from tests.serving import oracle

IDLE = 45  # sessions stepped once before and after each change (with the load's)
MOVE_SECONDS = 60.0  # of calls after a change, until every session that moves has moved


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


def bring_over(
    cluster: Cluster,
    load: Load,
    idle: list[str],
    expected: set[str],
    new: Maglev,
    since: dict[str, int],
) -> tuple[dict[str, set[str]], int]:
    """Rounds of calls on the idle sessions (the load makes its own) until each session
    that Envoy's new table moves has been brought back by its new replica (MOVE_SECONDS at
    most): what `loaded` says then, and the rounds it took after the first. For a moment
    after a new replica is in Envoy's routing and table (its admin says so) some calls for
    its sessions still reach their old replica, which still owns them and serves them (seen
    for up to two rounds, each the 45 calls and two of every load session's); each round
    waits until Envoy routes to every replica, and calls only the sessions still to move."""
    deadline = time.monotonic() + MOVE_SECONDS
    rounds = 0
    while True:
        brought = loaded(cluster, since)
        missing = {s for s in expected if s not in brought.get(new.replica_of(s), set())}
        if not missing or time.monotonic() > deadline:
            return brought, rounds
        rounds += 1
        cluster.wait_routed(set(new.replicas))
        touch(cluster, [s for s in idle if s in missing])
        load.settled()


def history(cluster: Cluster, sessions: set[str], old: Maglev, new: Maglev) -> str:
    """What each replica's log says of `sessions`, and Envoy's retries and ejections (a
    failure's message: a string, which pytest does not shorten)."""
    lines = [str(cluster.envoy_stats("upstream_rq_retry", "ejections"))]
    for session in sorted(sessions)[:4]:
        lines.append(f"{session}: table {old.replica_of(session)} -> {new.replica_of(session)}")
        lines += [f"  {name} {e['time'][11:23]} {e['event']} {e.get('step', '')}"
                  for name in cluster.replica_names(cluster.state())
                  for e in cluster.replica_events(name) if e.get("session") == session]  # fmt: skip
    return "\n".join(lines)


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
            expected = {s for s in sessions if old.replica_of(s) != new.replica_of(s)}
            brought, rounds = bring_over(healthy, load, idle, expected, new, since)
            moved = set().union(*brought.values()) & set(sessions)
            # each that moved was brought back by its new replica; nothing else was
            assert moved == expected, (
                f"to {replicas}:\n{history(healthy, moved ^ expected, old, new)}"
            )
            assert all(new.replica_of(s) == r for r, ss in brought.items() for s in ss & moved)
            fraction = len(moved) / len(sessions)
            report.append(
                f"{5 - replicas} -> {replicas}: {len(moved)} of {len(sessions)} sessions moved "
                f"({fraction:.0%}; `scale` said {moved_said} of {total}; "
                f"{rounds} more rounds of calls)"
            )
            print(healthy.envoy_stats("upstream_rq_retry", "ejections_enforced_total"))
            assert 0.15 < fraction < 0.55, report  # about 1/3: 1/N of N = 3
            assert moved_said <= total and abs(moved_said / total - 1 / 3) < 0.2, report
    finally:
        load.stop()
    print("\n" + "; ".join(report))
    check(load, reference, healthy)

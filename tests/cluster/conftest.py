"""One real cluster for every test of tests/cluster (three replicas of ntm-copy and a small
VMED behind Envoy, on one Redis), and a lone memory-store server given the same calls as
the reference its outputs must equal. Each test leaves the cluster as it found it: three
healthy replicas in Envoy's routing. They live as long as this package's tests (not the
session's: idle, they would still hold a core's share of health checks and six processes'
memory for the rest of the suite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.child_cluster import Cluster
from bench.child_server import ServerProcess
from tests.serving.oracle import LIMIT
from tests.tiny_vmed import tiny_vmed

CHAT = "vmed-tiny"

# A snapshot every 64 steps (1024 by default): a session that moves to another replica
# replays at most about that many, a few ms each, which the failover pause includes. Tests
# stop a replica's model process (SIGSTOP) on purpose: its watchdog must not end it first.
ARGS = ("--max-new-tokens", str(LIMIT), "--max-steps-per-call", "64", "--snapshot-every", "64",
        "--model-timeout", "600")  # fmt: skip


@pytest.fixture(scope="package")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory, _ = tiny_vmed(tmp_path_factory.mktemp("model") / CHAT)
    return directory


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory, chat_model: Path) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster") / "dir"
    running = Cluster(directory, 3, "--models", f"ntm-copy,{chat_model}", *ARGS).start()
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log_text()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The cluster with its three replicas serving and routed to."""
    if len(cluster.replica_names(cluster.state())) != 3:
        assert cluster.command_line("scale", "3").returncode == 0
    cluster.healthy(3)
    return cluster


@pytest.fixture(scope="package")
def reference(
    tmp_path_factory: pytest.TempPathFactory, chat_model: Path
) -> Iterator[ServerProcess]:
    with ServerProcess(
        tmp_path_factory.mktemp("reference"), "--models", f"ntm-copy,{chat_model}", *ARGS
    ) as server:
        yield server

"""The cluster's metrics: every series of every replica carries its `replica` label, and a
real Prometheus run on the configuration `memserve cluster` writes (DIR/prometheus.yml, the
replicas in a file it watches; deploy/prometheus.yml is the same with the default ports, and
tests/cluster/test_config.py has `promtool check config` accept both) scrapes every replica
and Envoy's admin stats."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from bench.child_cluster import Cluster
from tests.serving.client import scrape

LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy: loopback


def test_every_replica_series_carries_its_replica_label(healthy: Cluster) -> None:
    for name in healthy.replica_names(healthy.state()):
        samples = scrape(healthy.metrics_url(name))
        ours = [
            (metric, dict(labels)) for metric, labels in samples if metric.startswith("memserve_")
        ]
        assert ours, name
        unlabelled = [m for m, labels in ours if labels.get("replica") != name]
        assert not unlabelled, (name, sorted(set(unlabelled))[:5])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with LOCAL.open(url, timeout=10) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_every_replica_and_envoy(healthy: Cluster, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is missing: run `make system-deps`"
    generated = (healthy.directory / "prometheus.yml").read_text()
    fast = generated.replace("scrape_interval: 15s", "scrape_interval: 1s", 1)
    fast = fast.replace("scrape_timeout: 10s", "scrape_timeout: 1s", 1)  # not 15 s
    assert fast.count(": 1s") == 2, generated
    config = tmp_path / "prometheus.yml"
    config.write_text(fast)
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        names = set(healthy.replica_names(healthy.state()))
        deadline, seen, edge = time.monotonic() + 60, set(), []
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                seen = {r["metric"]["replica"] for r in query(port, "memserve_build_info")}
                edge = query(
                    port, 'envoy_cluster_membership_healthy{envoy_cluster_name="memserve"}'
                )
            except OSError:
                continue  # not listening yet
            if seen == names and edge and float(edge[0]["value"][1]) == len(names):
                break
        assert seen == names, (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
        assert edge and float(edge[0]["value"][1]) == len(names), edge
        up = query(port, "up")
        assert {r["metric"]["job"] for r in up} == {"memserve", "envoy"}
        assert all(r["value"][1] == "1" for r in up), up
    finally:
        server.terminate()
        server.wait(30)

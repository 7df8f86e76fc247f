"""deploy/k8s rendered as `kubectl apply -k` would: the resources of a kustomization (and of
the ones it builds on) with its JSON 6902 patches applied. Enough of kustomize for these
files (resources, patches with a kind/name target), so the tests check what is applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonpatch
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def render(directory: Path) -> list[dict[str, Any]]:
    """Every resource `kubectl apply -k directory` applies."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization", directory
    known = {"apiVersion", "kind", "resources", "patches"}
    assert set(kustomization) <= known, f"{directory}: {set(kustomization) - known}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", ()):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", ()):
        target = patch["target"]
        matches = [
            r for r in resources
            if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]
        ]  # fmt: skip
        assert len(matches) == 1, f"{directory}: patch target {target} matches {len(matches)}"
        patched = jsonpatch.apply_patch(matches[0], yaml.safe_load(patch["patch"]))
        resources[resources.index(matches[0])] = patched
    return resources


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]

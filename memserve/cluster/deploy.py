"""deploy/envoy.yaml and deploy/prometheus.yml: what `memserve cluster` generates, for its
default ports and three replicas, with the replicas written out, for whoever runs Envoy and
Prometheus themselves. `python -m memserve.cluster.deploy DIR` writes them (tests/cluster
checks that the committed files are what it writes)."""

from __future__ import annotations

import sys
from pathlib import Path

from memserve.cluster import envoy, prometheus

HOST, PORT, ADMIN_PORT, REPLICA_PORT, METRICS_PORT, REPLICAS = (
    "127.0.0.1",
    50051,
    9901,
    50052,
    9464,
    3,
)


def files() -> dict[str, str]:
    """File name -> contents."""
    names = [f"r{i}" for i in range(1, REPLICAS + 1)]
    endpoints = [envoy.Endpoint(n, HOST, REPLICA_PORT + i) for i, n in enumerate(names)]
    targets = [f"{HOST}:{METRICS_PORT + i}" for i in range(REPLICAS)]
    return {
        "envoy.yaml": envoy.bootstrap(HOST, PORT, ADMIN_PORT, endpoints=endpoints),
        "prometheus.yml": prometheus.config(f"{HOST}:{ADMIN_PORT}", targets=targets),
    }


def main(directory: str) -> None:
    for name, text in files().items():
        (Path(directory) / name).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "deploy")

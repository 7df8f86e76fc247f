"""deploy/grafana/memserve.json: every panel's PromQL parses and returns data when a real
Prometheus scrapes a live replica under load (a replica with a Redis store, so that the
replica label and the store's metrics are there; a small VMED, so that the generation
panels have data; two slots for more sessions, so that sessions park and come back)."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench.child_server import ServerProcess
from bench.redis_server import RedisServer
from protos import memserve_pb2
from serving.wire import encode
from tests.prometheus_server import poll, prometheus_binary, query, running_prometheus, write_config
from tests.tiny_vmed import tiny_vmed

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "memserve.json"
# What Grafana puts in place of the dashboard's variables and macros.
VARIABLES = {"$__rate_interval": "30s", "$job": "memserve", "$replica": ".*", "$model": ".*"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


def load(stub: Any, stop: threading.Event, chat: str) -> None:
    """Step four sessions over two slots, talk to the VMED, and miss now and then."""
    rng = np.random.default_rng()
    create = memserve_pb2.CreateSessionRequest
    steppers = [stub.CreateSession(create(model="ntm-copy")).session_id for _ in range(4)]
    talker = stub.CreateSession(create(model=chat)).session_id
    while not stop.is_set():
        for session in steppers:
            inputs = encode(rng.random((2, 9), dtype=np.float32))
            stub.Step(memserve_pb2.StepRequest(session_id=session, inputs=inputs))
        request = memserve_pb2.GenerateRequest(session_id=talker, text="hi there", max_tokens=4)
        list(stub.Generate(request))
        with contextlib.suppress(grpc.RpcError):  # NOT_FOUND: the errors panel's data
            stub.GetSession(memserve_pb2.GetSessionRequest(session_id=uuid.uuid4().hex))


def test_every_panel_returns_data_from_a_live_replica(tmp_path: Path) -> None:
    directory, _ = tiny_vmed(tmp_path / "vmed-tiny")
    queries = panel_queries()
    assert len(queries) >= 20
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        ServerProcess(
            tmp_path, "--models", f"ntm-copy,{directory}", "--slots", "2", "--replica", "r1",
            "--store", redis_server.url,
        ) as server,
    ):  # fmt: skip
        config = write_config(tmp_path, server.metrics_port)
        stop = threading.Event()
        worker = threading.Thread(target=load, args=(server.stub(), stop, "vmed-tiny"))
        worker.start()
        try:
            with running_prometheus(prometheus_binary(), tmp_path, config) as base:
                for title, expr in queries:

                    def answer(expr: str = expr) -> float | None:
                        values = [float(s["value"][1]) for s in query(base, expr)]
                        finite = [v for v in values if math.isfinite(v)]
                        return finite[0] if finite else None

                    poll(f"panel {title!r}: {expr}", 90, answer, between=0.5)
        finally:
            stop.set()
            worker.join(60)
    assert not worker.is_alive()


@pytest.mark.parametrize("name", ["job", "replica", "model"])
def test_each_variable_has_a_query_grafana_can_run(name: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == name)
    assert variable["query"]["query"].startswith("label_values(")
    assert variable["allValue"] == ".*" and variable["includeAll"]

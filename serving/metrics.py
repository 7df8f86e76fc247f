"""The server's Prometheus metrics, in a registry of its own (two servers in one process,
as in the tests, do not share counts), served over HTTP at /metrics.

Names follow GUIDE.md: prefix `memserve_`, base units, histograms, low-cardinality labels.
"""

from __future__ import annotations

import platform

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from memserve import __version__

# 25 us doubling to ~13 s: a CPU step of one session up to a long multi-step call.
LATENCY_BUCKETS = tuple(25e-6 * 2**k for k in range(20))
BATCH_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024 sessions


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "memserve_request_duration_seconds",
            "Time from receiving a request to answering it (StepStream: per message)",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "memserve_queue_wait_seconds",
            "Time a Step call waits for its first batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "memserve_batch_size",
            "Sessions stepped by one launch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "memserve_step_duration_seconds",
            "Time of one batched step (one launch) of a model",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "memserve_sessions",
            "Live sessions by where their state is",
            ["model", "state"],
            registry=r,
        )
        self.slots_capacity = Gauge(
            "memserve_slots_capacity", "Slots in the model's state pool", ["model"], registry=r
        )
        self.slots_used = Gauge(
            "memserve_slots_used", "Slots holding an active session", ["model"], registry=r
        )
        self.queue_length = Gauge(
            "memserve_queue_length", "Step calls waiting or running", ["model"], registry=r
        )
        self.evictions = Counter(
            "memserve_session_evictions",
            "Sessions moved out of a slot or ended by the server (reason: expired, "
            "parked_host, parked_disk)",
            ["model", "reason"],
            registry=r,
        )
        self.restores = Counter(
            "memserve_session_restores",
            "Parked sessions put back into a slot, by where they came from",
            ["model", "source"],
            registry=r,
        )
        self.rejected = Counter(
            "memserve_requests_rejected",
            "Requests refused before doing anything, by reason",
            ["reason"],
            registry=r,
        )
        self.build_info = Info("memserve_build", "Versions this server runs", registry=r)
        self.build_info.info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
            }
        )

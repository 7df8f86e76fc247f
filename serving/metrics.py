"""The server's Prometheus metrics, in a registry of its own (two servers in one process,
as in the tests, do not share counts), served over HTTP at /metrics.

Names follow GUIDE.md: prefix `memserve_`, base units, histograms, low-cardinality labels.
"""

from __future__ import annotations

import platform

import torch
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from memserve import __version__

# 25 us doubling to ~52 s: a CPU step of one session up to a long multi-step call.
LATENCY_BUCKETS = tuple(25e-6 * 2**k for k in range(22))
EVICTION_REASONS = ("expired", "parked_host", "parked_disk")
RESTORE_SOURCES = ("host", "disk")
REJECTION_REASONS = (
    "invalid_argument", "not_found", "failed_precondition", "resource_exhausted",
    "unavailable", "cancelled", "internal",
)  # fmt: skip

# `*_created` series double the series count and nothing here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]
BATCH_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024 sessions


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # memory, CPU, file descriptors, GC of this process
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
            "Requests refused without doing anything, by reason (the status code, lowercase)",
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
        for reason in REJECTION_REASONS:  # present at 0 from the start, for rate() and alerts
            self.rejected.labels(reason)

    def add_model(self, model: str) -> None:
        """Create a model's labelled counters at 0, so they exist before the first event."""
        for reason in EVICTION_REASONS:
            self.evictions.labels(model, reason)
        for source in RESTORE_SOURCES:
            self.restores.labels(model, source)

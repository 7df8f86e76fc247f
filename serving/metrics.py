"""The server's Prometheus metrics, in a registry of its own (two servers in one process,
as in the tests, do not share counts), served over HTTP at /metrics.

Names follow GUIDE.md: prefix `memserve_`, base units, histograms, low-cardinality labels.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

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
    Metric,
    disable_created_metrics,
)
from prometheus_client.registry import Collector

from memserve import __version__

# 25 us doubling to ~52 s: a CPU step of one session up to a long multi-step call.
LATENCY_BUCKETS = tuple(25e-6 * 2**k for k in range(22))
EVICTION_REASONS = ("expired", "parked_host", "parked_disk")
RESTORE_SOURCES = ("host", "disk")
REJECTION_REASONS = (
    "invalid_argument", "not_found", "failed_precondition", "resource_exhausted",
    "unavailable", "cancelled", "internal", "data_loss",
)  # fmt: skip

# `*_created` series double the series count and nothing here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]
BATCH_BUCKETS = tuple(float(2**k) for k in range(11))  # 1 .. 1024 sessions


class Relabelled(Collector):
    """A registry's metrics with one more label on every sample: what a cluster replica
    serves, so that its series stay apart from the other replicas' in one Prometheus."""

    def __init__(self, registry: CollectorRegistry, label: str, value: str) -> None:
        self.registry, self.label, self.value = registry, label, value

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            relabelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                relabelled.add_sample(
                    sample.name,
                    {**sample.labels, self.label: self.value},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield relabelled


def served_registry(metrics: Metrics, replica: str) -> CollectorRegistry:
    """The registry /metrics serves: the server's own, with `replica` on every series
    when it is one replica of a cluster."""
    if not replica:
        return metrics.registry
    served = CollectorRegistry(auto_describe=False)
    served.register(Relabelled(metrics.registry, "replica", replica))
    return served


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
        self.queue_capacity = Gauge(
            "memserve_queue_capacity",
            "Calls a model takes queued or running before it refuses more (max_queued_calls)",
            ["model"],
            registry=r,
        )
        self.park_bytes = Gauge(
            "memserve_park_bytes",
            "Bytes of parked session states, by tier (host, disk)",
            ["tier"],
            registry=r,
        )
        self.park_capacity_bytes = Gauge(
            "memserve_park_capacity_bytes",
            "Bytes each parking tier may hold (park_host_bytes, park_disk_bytes)",
            ["tier"],
            registry=r,
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
        self.time_to_first_token = Histogram(
            "memserve_time_to_first_token_seconds",
            "Generate: from the request to the first piece of the reply",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "memserve_inter_token_latency_seconds",
            "Generate: between two pieces of a reply",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "memserve_generated_tokens",
            "Tokens generated by Generate calls",
            ["model"],
            registry=r,
        )
        self.generations_in_flight = Gauge(
            "memserve_generations_in_flight", "Generate calls being answered", registry=r
        )
        self.store_commit_duration = Histogram(
            "memserve_store_commit_duration_seconds",
            "Time of one write to the session store (one fsync, one Redis round trip)",
            ["store"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_commit_records = Histogram(
            "memserve_store_commit_records",
            "Records one write to the session store carries (group commit)",
            ["store"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "memserve_store_up",
            "1 while the session store takes writes, 0 while it is unavailable",
            ["store"],
            registry=r,
        )
        # Per tenant: only the tenants of the keys file are labels (bounded), never a key.
        self.tenant_requests = Counter(
            "memserve_tenant_requests",
            "Requests answered, by tenant and status code",
            ["tenant", "code"],
            registry=r,
        )
        self.tenant_rejected = Counter(
            "memserve_tenant_requests_rejected",
            "Requests refused without doing anything, by tenant and reason",
            ["tenant", "reason"],
            registry=r,
        )
        self.tenant_sessions = Gauge(
            "memserve_tenant_sessions", "Live sessions of each tenant", ["tenant"], registry=r
        )
        self.tenant_quota_used = Gauge(
            "memserve_tenant_quota_used",
            "How much of each quota a tenant uses now, as a fraction (1: at the quota)",
            ["tenant", "quota"],
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

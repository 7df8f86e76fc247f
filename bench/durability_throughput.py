"""Part 1 of bench/durability.py: session-steps/s and latency of the five servers, each
(round, shape, store) a level of bench/serving.py's `measure_level`, as ratios to `memory`'s
in the same round; the targets decided on the median of those ratios.

Between levels every server is let go quiet: a level's sessions expire `level_ttl` seconds
after it (they are not deleted: `ExpiringCalls`), and a durable server then commits their
snapshots and deletions in the background. Waiting only for the server about to be measured
let that work of the level before, on another server, land in this level's window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.durability_servers import CONFIGS, DurableServer, Settings
from bench.serving import (
    MODEL,
    LevelRow,
    Shape,
    StepCalls,
    measure_level,
    median_verdict,
    print_level,
    quotient,
)
from clients.loadgen import server_metrics
from clients.loadgen.schedule import Session
from protos import memserve_pb2

SHAPES = (Shape("unary_t1", "Step", 1), Shape("unary_t20", "Step", 20))
# The issue's targets: throughput as a fraction of `memory`'s.
TARGETS = {"dir-launch": 0.85, "redis-launch": 0.7}
SETTLE_SECONDS = 60.0  # a level's sessions must have expired this long after it


@dataclass
class StoreLevel:
    """One (round, shape, store) level: what the client measured, the store's work, and
    the sessions the other servers held as it ended (0: none of them was busy)."""

    config: str
    store: str
    durability: str
    row: LevelRow
    store_work: dict[str, float]
    other_servers_sessions: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "store": self.store,
            "durability": self.durability,
            **asdict(self.row),
            "ok": self.row.ok,
            **self.store_work,
            "other_servers_sessions": self.other_servers_sessions,
        }


class ExpiringCalls(StepCalls):
    """bench/serving.py's Step calls, on sessions that are left to expire when their level
    ends instead of being deleted. A DeleteSession on a durable server holds the engine's
    lock until its deletion is committed (serving/lifecycle.py: `delete`), so each one stalls
    every launch for a commit and deletions run one at a time: with `interval`, 1 s each, and
    the 256 of a level took over 4 minutes. Expiry commits its deletions in the background."""

    ttl = 5.0

    def session_request(self, sequence: int) -> memserve_pb2.CreateSessionRequest:
        return memserve_pb2.CreateSessionRequest(model=MODEL, ttl_seconds=self.ttl)

    async def release(self, session: Session) -> None:
        await super().release(session)
        session.gone = True  # the closed loop deletes no session marked gone


async def sessions_held(server: DurableServer) -> int:
    samples = await asyncio.to_thread(server_metrics.scrape, server.metrics_url)
    return int(server_metrics.total(samples, "memserve_sessions"))


async def settle(servers: list[DurableServer], timeout: float = SETTLE_SECONDS) -> None:
    """Wait until no server holds a session (the last level's have expired)."""
    deadline = time.monotonic() + timeout
    for server in servers:
        while await sessions_held(server):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} still holds sessions {timeout:g} s on")
            await asyncio.sleep(0.2)


async def measure_throughput(
    settings: Settings, servers: list[DurableServer], input_size: int, output_size: int
) -> list[StoreLevel]:
    """Every round: each shape on every server back to back, in alternating order, each
    level begun with every server quiet."""

    class Calls(ExpiringCalls):
        ttl = settings.level_ttl

    levels: list[StoreLevel] = []
    for round_ in range(1, settings.rounds + 1):
        order = servers if round_ % 2 else servers[::-1]
        for shape, concurrency in zip(SHAPES, settings.concurrency, strict=True):
            for server in order:
                await settle(servers)
                row = await measure_level(
                    server, server.config.name, shape, concurrency, settings,
                    input_size, output_size, round_, Calls,
                )  # fmt: skip
                others = [await sessions_held(s) for s in servers if s is not server]
                levels.append(
                    StoreLevel(
                        server.config.name,
                        server.config.store,
                        server.config.durability,
                        row,
                        server.window_store(),
                        sum(others),
                    )
                )
                print_level(row)
    return levels


def find_level(levels: list[StoreLevel], config: str, shape: str, round_: int) -> StoreLevel:
    return next(
        level
        for level in levels
        if (level.config, level.row.shape, level.row.round) == (config, shape, round_)
    )


def round_ratios(levels: list[StoreLevel], rounds: int) -> list[dict[str, dict[str, float]]]:
    """Per round: every store's session-steps/s over `memory`'s, by shape."""
    ratios = []
    for round_ in range(1, rounds + 1):
        by_config: dict[str, dict[str, float]] = {}
        for config in CONFIGS:
            by_config[config.name] = {
                shape.name: quotient(
                    find_level(levels, config.name, shape.name, round_).row.session_steps_per_s,
                    find_level(levels, "memory", shape.name, round_).row.session_steps_per_s,
                )
                for shape in SHAPES
            }
        ratios.append(by_config)
    return ratios


def throughput_targets(
    levels: list[StoreLevel], ratios: list[dict[str, dict[str, float]]]
) -> dict[str, Any]:
    """Each target store against `memory`, per shape, decided on the median of the rounds'
    ratios; a store passes when both shapes do. Levels with errors fail."""
    targets: dict[str, Any] = {}
    for config, threshold in TARGETS.items():
        shapes = {}
        for shape in SHAPES:
            compared = [
                level
                for level in levels
                if level.row.shape == shape.name and level.config in (config, "memory")
            ]
            shapes[shape.name] = median_verdict(
                threshold,
                [by_config[config][shape.name] for by_config in ratios],
                all(level.row.ok for level in compared),
            )
        targets[config] = {
            "threshold": threshold,
            "shapes": shapes,
            "pass": all(result["pass"] for result in shapes.values()),
        }
    return targets

"""`Settings`: everything one `memserve loadgen` run works from, checked by the command line
(`cli.py`) and read by the run (`run.py`) and its workloads (`workloads.py`).

Light on purpose, like `cli.py`: `memserve --help` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.channel import TLS


@dataclass(frozen=True)
class Settings:
    """Everything one run needs, checked; `run.run` works from this alone."""

    workload: str  # "step" or "chat"
    model: str
    target: str
    concurrency: tuple[int, ...]  # closed-loop levels; empty when `rates` is set
    rates: tuple[float, ...]  # open-loop levels (requests/s)
    warmup: float
    duration: float | None  # seconds per level, or
    requests: int | None  # measured requests per level
    max_outstanding: int
    drain_timeout: float
    timeout: float
    connect_timeout: float
    channels: int
    seed: int
    session_ttl: float | None
    metrics_url: str | None  # None: do not scrape
    progress: bool
    json_path: Path | None = None
    csv_path: Path | None = None
    plot_path: Path | None = None
    tls: TLS | None = None  # None: plaintext
    protocol: str = "memserve"  # or "kserve": the v2 inference API (clients/loadgen/kserve.py)
    token: str | None = field(default=None, repr=False)
    # step
    steps: int = 0
    steps_per_call: int = 0
    # chat
    turns: int = 0
    prompts: tuple[str, ...] = ()
    prompts_source: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    stop: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """The load shape: "open" (a fixed request rate) or "closed" (C workers)."""
        return "open" if self.rates else "closed"

    @property
    def levels(self) -> tuple[float, ...]:
        return self.rates if self.rates else tuple(float(c) for c in self.concurrency)

    @property
    def requests_per_session(self) -> int:
        """K: Step calls (step) or Generate turns (chat) between CreateSession and Delete."""
        return self.steps if self.workload == "step" else self.turns

    def record(self) -> dict[str, Any]:
        """The settings as JSON-friendly values (the prompts as their count and source)."""
        record: dict[str, Any] = {
            "workload": self.workload,
            "protocol": self.protocol,
            "model": self.model,
            "target": self.target,
            "mode": self.mode,
            "concurrency": list(self.concurrency),
            "rates": list(self.rates),
            "warmup_s": self.warmup,
            "duration_s": self.duration,
            "requests": self.requests,
            "max_outstanding": self.max_outstanding,
            "drain_timeout_s": self.drain_timeout,
            "timeout_s": self.timeout,
            "connect_timeout_s": self.connect_timeout,
            "channels": self.channels,
            "seed": self.seed,
            "session_ttl_s": self.session_ttl,
            "metrics_url": self.metrics_url,
            "tls": self.tls is not None,
            "token_sent": self.token is not None,  # never the token itself
        }
        if self.workload == "step":
            record.update(steps=self.steps, steps_per_call=self.steps_per_call)
        else:
            record.update(
                turns=self.turns,
                prompts=len(self.prompts),
                prompts_source=self.prompts_source,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                stop=list(self.stop),
            )
        return record

"""What one level measured: latency histograms (HdrHistogram, microseconds, 3 significant
digits), requests by outcome, every call by method and status code, and the summary the
report and the JSON take. The one recorder of the repository: the benchmarks (`bench/`)
record their levels with it too.

Kinds of counts, kept apart on purpose:

- measured requests: the requests (Step calls or Generate turns) whose intended start lies
  in the level's measuring window; their latencies and errors are the level's result;
- answers in the window: what arrived inside the window, whenever its request started
  (warm-up ones too). The OK answers are the throughput, which they divide by the window's
  length, so that neither a slow or failed request after it nor the requests still in
  flight at its end bias it. The benchmarks report this view whole: the latencies, pieces
  and errors of what arrived in the window (`answer_*`, `window_errors`);
- calls: every RPC the level made, warm-up and teardown included, by method and status
  code: what the server's `memserve_request_duration_seconds_count` must agree with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

HIGHEST_MICROSECONDS = 3_600_000_000  # one hour: anything longer is clamped to it
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
# Open loop: a request sent this long after its intended time is late: above the event
# loop's timer granularity and its jitter on a busy machine (docs/performance.md).
LATE_SECONDS = 0.005
OK = "OK"
INVALID_RESPONSE = "INVALID_RESPONSE"  # the server said OK, the answer was not well formed


@dataclass
class Outcome:
    """How one request ended, timed with `time.perf_counter()`."""

    code: str  # "OK", a gRPC status code name, or INVALID_RESPONSE
    done: float  # when the answer (or the error) arrived
    detail: str = ""  # the server's message, for errors
    steps: int = 0  # Step: the inputs T of an answered call
    pieces: list[float] = field(default_factory=list)  # Generate: when each text piece came
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""  # Generate: "eos", "stop" or "length"

    @property
    def first_piece(self) -> float | None:
        return self.pieces[0] if self.pieces else None

    def gaps(self) -> list[float]:
        """Seconds between successive text pieces."""
        return [later - earlier for earlier, later in itertools.pairwise(self.pieces)]


class Latencies:
    """An HdrHistogram of durations given in seconds, summarized in milliseconds."""

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, HIGHEST_MICROSECONDS, SIGNIFICANT_DIGITS)

    def record(self, seconds: float) -> None:
        microseconds = round(seconds * 1e6)
        self.histogram.record_value(min(max(1, microseconds), HIGHEST_MICROSECONDS))

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        return float(self.histogram.get_value_at_percentile(percentile)) / 1e3

    def microseconds(self) -> dict[str, int]:
        """p50, p90, p99 and max in microseconds (as the benchmarks record them)."""
        histogram = self.histogram
        summary = {f"p{p:g}": int(histogram.get_value_at_percentile(p)) for p in (50, 90, 99)}
        summary["max"] = int(histogram.get_max_value())
        return summary

    @property
    def mean_microseconds(self) -> float:
        return float(self.histogram.get_mean_value())

    def summary(self) -> dict[str, float] | None:
        """count, p50, p90, p95, p99, p99.9, mean, min and max in ms; None when empty."""
        if self.count == 0:
            return None
        summary: dict[str, float] = {"count": self.count}
        for percentile in PERCENTILES:
            summary[f"p{percentile:g}"] = self.percentile_ms(percentile)
        summary["mean"] = float(self.histogram.get_mean_value()) / 1e3
        summary["min"] = float(self.histogram.get_min_value()) / 1e3
        summary["max"] = float(self.histogram.get_max_value()) / 1e3
        return summary


class CallCounts:
    """Calls by method and status code name (plus the first message of each error)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.details: dict[tuple[str, str], str] = {}

    def add(self, method: str, code: str, detail: str = "", count: int = 1) -> None:
        by_code = self.counts.setdefault(method, {})
        by_code[code] = by_code.get(code, 0) + count
        if detail and (method, code) not in self.details:
            self.details[(method, code)] = detail

    def merge(self, other: CallCounts) -> None:
        for method, by_code in other.counts.items():
            for code, count in by_code.items():
                self.add(method, code, other.details.get((method, code), ""), count)

    def total(self, method: str, code: str | None = None) -> int:
        by_code = self.counts.get(method, {})
        return sum(n for c, n in by_code.items() if code is None or c == code)

    def failures(self) -> dict[str, dict[str, int]]:
        """The calls that did not end OK, by method and code."""
        failed = {
            method: {code: n for code, n in by_code.items() if code != OK}
            for method, by_code in self.counts.items()
        }
        return {method: by_code for method, by_code in failed.items() if by_code}

    def record(self) -> dict[str, dict[str, int]]:
        return {method: dict(sorted(by_code.items())) for method, by_code in
                sorted(self.counts.items())}  # fmt: skip


class Recorder:
    """One level's measurements. `start`/`end` bound the measuring window (perf_counter
    seconds; `end` None while a count-bounded level runs)."""

    def __init__(self, method: str) -> None:
        self.method = method  # "Step" or "Generate" (kserve: ModelInfer, ModelStreamInfer)
        self.calls = CallCounts()
        self.latency = Latencies()  # intended start -> last answer
        self.ttft = Latencies()  # intended start -> first text piece (Generate)
        self.itl = Latencies()  # between text pieces (Generate)
        self.send_lag = Latencies()  # open loop: actual send - intended start
        self.session_calls = {"CreateSession": Latencies(), "DeleteSession": Latencies()}
        self.issued = 0  # measured requests sent (or that tried to get a session)
        self.completed = 0  # of those, answered or refused
        self.cancelled = 0  # of those, cancelled by Ctrl-C (not the server's doing)
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.error_details: dict[str, str] = {}
        self.late = 0  # open loop: sent more than LATE_SECONDS after the intended time
        self.capped = 0  # open loop: waited because --max-outstanding requests were in flight
        self.unsent = 0  # open loop: never sent (the drain timeout or Ctrl-C came first)
        self.session_steps = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.answered = 0  # OK answers that arrived in the window (of any request)
        self.answered_steps = 0  # their session-steps (Step)
        self.answered_tokens = 0  # their completion tokens (Generate)
        self.answered_prompt_tokens = 0  # and prompt tokens
        self.finish_reasons: dict[str, int] = {}  # and how they ended (Generate)
        self.answer_latency = Latencies()  # their start -> their answer
        self.answer_ttft = Latencies()  # start -> first piece, for first pieces in the window
        self.answer_itl = Latencies()  # between pieces, for pieces in the window
        self.window_errors: dict[str, int] = {}  # failures that arrived in the window
        self.start = 0.0
        self.end: float | None = None
        self.last_done: float | None = None
        self.interrupted = False

    def sent(self, lag: float | None = None, capped: bool = False) -> None:
        """A measured request goes out (`lag`: how late, in the open loop)."""
        self.issued += 1
        if lag is not None:
            self.send_lag.record(max(0.0, lag))
            self.late += lag > LATE_SECONDS
            self.capped += capped

    def finished(self, outcome: Outcome, started: float) -> None:
        """Any request ended, measured or not (`started`: when it started, or was due):
        what of it arrived inside the window counts as answered there. (While a
        count-bounded window is open, `end` is None: its end comes later than any answer
        already here.)"""
        if not self.inside(outcome.done):
            if outcome.code == OK:
                self._pieces_in_window(outcome, started)  # some may have come in the window
            return
        if outcome.code != OK:
            self.window_errors[outcome.code] = self.window_errors.get(outcome.code, 0) + 1
            return
        self.answered += 1
        self.answered_steps += outcome.steps
        self.answered_tokens += outcome.completion_tokens
        self.answered_prompt_tokens += outcome.prompt_tokens
        if outcome.finish_reason:
            reason = outcome.finish_reason
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        self.answer_latency.record(outcome.done - started)
        self._pieces_in_window(outcome, started)

    def _pieces_in_window(self, outcome: Outcome, started: float) -> None:
        previous = started
        for number, moment in enumerate(outcome.pieces):
            if self.inside(moment):
                (self.answer_itl if number else self.answer_ttft).record(moment - previous)
            previous = moment

    def inside(self, moment: float) -> bool:
        """Whether `moment` lies in the window (one without its end yet: after its start)."""
        return self.start <= moment and (self.end is None or moment <= self.end)

    def record(self, outcome: Outcome, intended: float) -> None:
        """A measured request ended; its latency counts from its intended start."""
        self.completed += 1
        self.last_done = outcome.done if self.last_done is None else max(self.last_done,
                                                                         outcome.done)  # fmt: skip
        if outcome.code != OK:
            self.errors[outcome.code] = self.errors.get(outcome.code, 0) + 1
            if outcome.detail:
                self.error_details.setdefault(outcome.code, outcome.detail)
            return
        self.ok += 1
        self.latency.record(outcome.done - intended)
        self.session_steps += outcome.steps
        self.completion_tokens += outcome.completion_tokens
        self.prompt_tokens += outcome.prompt_tokens
        if outcome.first_piece is not None:
            self.ttft.record(outcome.first_piece - intended)
        for gap in outcome.gaps():
            self.itl.record(gap)

    def window(self) -> float:
        """The measuring window's length in seconds (0 while it has no end)."""
        return 0.0 if self.end is None else max(0.0, self.end - self.start)

    def span(self) -> float:
        """Seconds from the window's start to the later of its end and the last measured
        answer (information: how long the measured requests took to come back)."""
        ends = [t for t in (self.end, self.last_done) if t is not None]
        return max(ends) - self.start if ends else 0.0

    def summary(self) -> dict[str, Any]:
        """The level's measured results (not its label or server metrics)."""
        window = self.window()
        per_s = (lambda n: n / window) if window > 0 else (lambda n: 0.0)
        requests: dict[str, Any] = {
            "issued": self.issued,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "ok": self.ok,
            "answered_in_window": self.answered,
            "errors": dict(sorted(self.errors.items())),
            "error_details": dict(sorted(self.error_details.items())),
        }
        throughput: dict[str, float] = {"requests_per_s": per_s(self.answered)}
        summary: dict[str, Any] = {
            "window_s": None if self.end is None else window,
            "span_s": self.span(),
            "interrupted": self.interrupted,
            "requests": requests,
            "throughput": throughput,
            "latency_ms": self.latency.summary(),
        }
        if self.method in (
            "Step",
            "ModelInfer",
        ):  # the step workload (ModelInfer: --protocol kserve)
            summary["session_steps"] = self.session_steps
            throughput["session_steps_per_s"] = per_s(self.answered_steps)
        else:
            summary["tokens"] = {
                "completion": self.completion_tokens,
                "prompt": self.prompt_tokens,
            }
            throughput["tokens_per_s"] = per_s(self.answered_tokens)
            summary["ttft_ms"] = self.ttft.summary()
            summary["itl_ms"] = self.itl.summary()
        summary["session_calls_ms"] = {
            method: latencies.summary() for method, latencies in self.session_calls.items()
        }
        summary["calls"] = self.calls.record()
        return summary

    def open_loop_summary(self) -> dict[str, Any]:
        """What the open loop adds: how punctually requests went out."""
        return {
            "late": self.late,
            "capped": self.capped,
            "unsent": self.unsent,
            "late_threshold_ms": LATE_SECONDS * 1e3,
            "send_lag_ms": self.send_lag.summary(),
        }

"""The server's own view of a level: its Prometheus page (/metrics) read before and after the
measuring window, and what the difference says (batch size, queue wait, step time, the
calls it answered). Names as `serving/metrics.py` exports them; a small parser of the text
format, so the client needs no Prometheus library.

The one scraper of the repository: the benchmarks (`bench/`) and the tests read the server's
metrics with `scrape` and `total` too.
"""

from __future__ import annotations

import math
import re
import urllib.request
from typing import Any

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

SCRAPE_TIMEOUT = 10.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

# The server's histograms a level reports (per model), by a short name, for each workload.
HISTOGRAMS = {
    "batch_size": "memserve_batch_size",
    "queue_wait": "memserve_queue_wait_seconds",
    "step_duration": "memserve_step_duration_seconds",
    "ttft": "memserve_time_to_first_token_seconds",
    "itl": "memserve_inter_token_latency_seconds",
}
REPORTED = {
    "step": ("batch_size", "queue_wait", "step_duration"),  # queue wait: Step calls only
    "chat": ("batch_size", "step_duration", "ttft", "itl"),
}
REQUESTS = "memserve_request_duration_seconds_count"
GENERATED_TOKENS = "memserve_generated_tokens_total"


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page by (name, sorted labels)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, _, label_text, value = match.group(1, 2, 3, 4)
        labels = []
        for label in _LABEL.finditer(label_text or ""):
            raw = label.group(2)
            labels.append((label.group(1), re.sub(r"\\.", lambda m: _ESCAPES.get(m[0], m[0]),
                                                  raw)))  # fmt: skip
        try:
            samples[(name, tuple(sorted(labels)))] = float(value)
        except ValueError:
            continue
    return samples


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT) -> Samples:
    """The page at `url`, parsed (not through any http_proxy: it is the server's own)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        text: str = response.read().decode("utf-8", errors="replace")
    return parse(text)


def first_scrape(url: str) -> tuple[Samples | None, str | None]:
    """The samples at `url` if it serves memserve metrics, else why not (in words)."""
    try:
        samples = scrape(url)
    except (OSError, ValueError) as error:
        return None, f"cannot read {url}: {error}"
    if not any(name.startswith("memserve_") for name, _ in samples):
        return None, f"{url} serves no memserve_ metrics"
    return samples, None


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of sample `name` over the label sets that include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def buckets(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by upper bound (the `le` label as the page
    writes it), summed over the label sets that include `labels`."""
    wanted = set(labels.items())
    counts: dict[str, float] = {}
    for (sample, sample_labels), value in samples.items():
        if sample == f"{name}_bucket" and wanted <= set(sample_labels):
            bound = dict(sample_labels)["le"]
            counts[bound] = counts.get(bound, 0.0) + value
    return counts


def histogram_delta(
    before: Samples, after: Samples, name: str, model: str
) -> dict[str, Any] | None:
    """count, mean and p99 (the upper bound of the bucket it falls in) of a histogram's
    observations between the scrapes; None when there were none."""
    count = total(after, f"{name}_count", model=model) - total(before, f"{name}_count", model=model)
    if count <= 0:
        return None
    summed = total(after, f"{name}_sum", model=model) - total(before, f"{name}_sum", model=model)
    later, earlier = buckets(after, name, model=model), buckets(before, name, model=model)
    p99: float | None = None
    for bound in sorted(later, key=float):
        if later[bound] - earlier.get(bound, 0.0) >= 0.99 * count:
            p99 = None if math.isinf(float(bound)) else float(bound)
            break
    return {"count": round(count), "mean": summed / count, "p99_upper_bound": p99}


def summarize(
    before: Samples, after: Samples, model: str, seconds: float, workload: str
) -> dict[str, Any]:
    """What the server measured for `model` over a window of `seconds` (times in ms)."""
    result: dict[str, Any] = {"seconds": seconds}
    for short in REPORTED[workload]:
        name = HISTOGRAMS[short]
        delta = histogram_delta(before, after, name, model)
        if delta is not None and name.endswith("_seconds"):  # report times in ms
            delta = {k: (v * 1e3 if v is not None and k != "count" else v) for k, v in
                     delta.items()}  # fmt: skip
        result[short if short == "batch_size" else f"{short}_ms"] = delta
    batches = result["batch_size"]
    result["launches"] = 0 if batches is None else batches["count"]
    if workload == "chat":
        result["generated_tokens"] = round(
            total(after, GENERATED_TOKENS, model=model) - total(before, GENERATED_TOKENS,
                                                                model=model)
        )  # fmt: skip
    result["requests"] = request_delta(before, after)
    return result


def request_delta(before: Samples, after: Samples) -> dict[str, dict[str, int]]:
    """The calls the server answered between two scrapes, by method and code."""
    counts: dict[str, dict[str, int]] = {}
    for (name, labels), value in after.items():
        delta = round(value - before.get((name, labels), 0.0))
        if name == REQUESTS and delta > 0:
            label = dict(labels)
            counts.setdefault(label.get("method", "?"), {})[label.get("code", "?")] = delta
    return {method: dict(sorted(by_code.items())) for method, by_code in sorted(counts.items())}

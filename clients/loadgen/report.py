"""What a run shows and writes: the table on stdout (a row as each level ends), the notes
under it, the JSON document, one CSV row per level, and the PNG of latency percentiles
against throughput."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

PLOTTED = ("p50", "p90", "p99", "p99.9")

Row = dict[str, Any]  # one level's JSON record


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.1f}" if value < 10_000 else f"{value:.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _get(row: Row, *path: str) -> Any:
    """row[a][b]...; None where a part is missing."""
    value: Any = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _errors(row: Row) -> int:
    return int(sum(row["requests"]["errors"].values()))


def _milliseconds(*path: str) -> Callable[[Row], str]:
    """A cell showing the milliseconds at `path` of a row."""
    return lambda row: _ms(_get(row, *path))


class Column:
    def __init__(self, title: str, width: int, cell: Callable[[Row], str]) -> None:
        self.title, self.width, self.cell = title, width, cell


def columns(workload: str, mode: str) -> list[Column]:
    """The table's columns for a workload and a load shape."""
    cols = [
        Column("level", 9, lambda r: str(r["level"])),
        Column("ok", 8, lambda r: str(r["requests"]["ok"])),
        Column("errors", 6, lambda r: str(_errors(r))),
    ]
    if mode == "open":
        cols += [
            Column("late", 6, lambda r: str(r["open_loop"]["late"])),
            Column("unsent", 6, lambda r: str(r["open_loop"]["unsent"])),
        ]
    if workload == "step":
        cols += [
            Column("req/s", 9, lambda r: _rate(r["throughput"]["requests_per_s"])),
            Column("steps/s", 9, lambda r: _rate(r["throughput"]["session_steps_per_s"])),
        ]
        percentiles: tuple[str, ...] = ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")
    else:
        cols += [
            Column("turns/s", 8, lambda r: _rate(r["throughput"]["requests_per_s"])),
            Column("tok/s", 8, lambda r: _rate(r["throughput"]["tokens_per_s"])),
        ]
        percentiles = ("p50", "p90", "p99", "p99.9", "max")
    for name in percentiles:
        cols.append(Column(name, 8, _milliseconds("latency_ms", name)))
    if workload == "chat":
        for kind, title in (("ttft_ms", "ttft"), ("itl_ms", "itl")):
            for name in ("p50", "p99"):
                cols.append(Column(f"{title} {name}", 9, _milliseconds(kind, name)))
    cols.append(Column("batch", 6, lambda r: _rate(_get(r, "server", "batch_size", "mean"))))
    if workload == "step":
        cols.append(Column("qwait", 7, _milliseconds("server", "queue_wait_ms", "mean")))
    return cols


class Table:
    """The terminal table, printed a row at a time."""

    def __init__(self, workload: str, mode: str, out: TextIO) -> None:
        self.columns = columns(workload, mode)
        self.out = out
        self.workload = workload
        self.mode = mode

    def header(self) -> None:
        unit = (
            "latency in ms from each request's intended start"
            if self.mode == "open"
            else "latency in ms per request"
        )
        print(f"\n{unit}; batch = the server's mean sessions per launch", file=self.out)
        if self.workload == "step":
            print("qwait = the server's mean queue wait of a Step call (ms)", file=self.out)
        titles = " ".join(f"{c.title:>{c.width}}" for c in self.columns)
        print(titles, file=self.out)
        print("-" * len(titles), file=self.out, flush=True)

    def row(self, row: Row) -> None:
        cells = " ".join(f"{c.cell(row):>{c.width}}" for c in self.columns)
        flag = "  (interrupted)" if row.get("interrupted") else ""
        print(cells + flag, file=self.out, flush=True)


def notes(rows: list[Row], document: dict[str, Any]) -> list[str]:
    """Lines under the table: errors and their messages, refused session calls, open-loop
    punctuality, the server's metrics, every call sent."""
    lines: list[str] = []
    for row in rows:
        requests = row["requests"]
        for code, count in requests["errors"].items():
            detail = requests["error_details"].get(code, "")
            lines.append(f"{row['level']}: {count} x {code}" + (f": {detail}" if detail else ""))
        if requests["cancelled"]:
            lines.append(f"{row['level']}: {requests['cancelled']} requests cancelled by Ctrl-C")
        for method in ("CreateSession", "DeleteSession"):
            for code, count in row["calls"].get(method, {}).items():
                if code != "OK":
                    lines.append(f"{row['level']}: {method} {count} x {code}")
        server = row.get("server") or {}
        if server.get("error"):
            lines.append(f"{row['level']}: server metrics: {server['error']}")
        open_loop = row.get("open_loop")
        if open_loop and (open_loop["late"] or open_loop["capped"] or open_loop["unsent"]):
            lag = open_loop["send_lag_ms"] or {}
            lines.append(
                f"{row['level']}: {open_loop['late']} requests sent over "
                f"{open_loop['late_threshold_ms']:g} ms after their intended time (send lag "
                f"p99 {_ms(lag.get('p99'))} ms, max {_ms(lag.get('max'))} ms); "
                f"{open_loop['capped']} waited for a place under --max-outstanding; "
                f"{open_loop['unsent']} never sent"
            )
    metrics = document.get("server_metrics") or {}
    if metrics.get("error"):
        lines.append(f"server metrics: {metrics['error']} (carried on without them)")
    sent = document["requests_sent"]
    summary = "; ".join(
        f"{method} " + ", ".join(f"{n} {code}" for code, n in by_code.items())
        for method, by_code in sent.items()
    )
    lines.append(f"calls sent (warm-up and teardown included): {summary}")
    counted = document.get("server_requests_during_run")
    if counted is not None:
        same = counted == sent
        lines.append(
            "the server counted the same calls over the run"
            if same
            else f"the server counted other calls over the run (other clients?): {counted}"
        )
    return lines


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def flat(row: Row) -> dict[str, Any]:
    """One level as flat CSV fields (nested keys joined by '_'; errors as CODE:N;...)."""
    fields: dict[str, Any] = {
        "level": row["level"],
        "mode": row["mode"],
        "concurrency": row["concurrency"],
        "rate": row["rate"],
        "window_s": row["window_s"],
        "span_s": row["span_s"],
        "interrupted": row["interrupted"],
    }
    requests = row["requests"]
    for key in ("issued", "completed", "ok", "answered_in_window"):
        fields[f"requests_{key}"] = requests[key]
    fields["errors"] = ";".join(f"{code}:{n}" for code, n in requests["errors"].items())
    for key, value in row["throughput"].items():
        fields[key] = value
    for group in ("latency_ms", "ttft_ms", "itl_ms"):
        if group in row:
            summary = row[group] or {}
            for key in ("p50", "p90", "p95", "p99", "p99.9", "mean", "min", "max"):
                fields[f"{group.removesuffix('_ms')}_{key}_ms"] = summary.get(key)
    if "tokens" in row:
        fields["completion_tokens"] = row["tokens"]["completion"]
        fields["prompt_tokens"] = row["tokens"]["prompt"]
    if "open_loop" in row:
        open_loop = row["open_loop"]
        for key in ("late", "capped", "unsent"):
            fields[key] = open_loop[key]
        lag = open_loop["send_lag_ms"] or {}
        fields["send_lag_p99_ms"] = lag.get("p99")
        fields["send_lag_max_ms"] = lag.get("max")
    server = row.get("server") or {}
    if "launches" in server:
        fields["server_launches"] = server["launches"]
        fields["server_batch_size_mean"] = _get(server, "batch_size", "mean")
    for name in ("queue_wait_ms", "step_duration_ms", "ttft_ms", "itl_ms"):
        if name in server:
            short = name.removesuffix("_ms")
            fields[f"server_{short}_mean_ms"] = _get(server, name, "mean")
            fields[f"server_{short}_p99_upper_bound_ms"] = _get(server, name, "p99_upper_bound")
    return fields


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [flat(row) for row in rows]
    names: list[str] = []
    for record in records:
        names += [name for name in record if name not in names]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        writer.writerows(records)


def _minor_label(value: float, _: object) -> str:
    """Label the log axis's minor ticks 2, 3 and 5 (x a power of ten); the rest stay bare."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 3, 5) else ""


def write_plot(path: Path, rows: list[Row], title: str, workload: str) -> None:
    """Latency percentiles (log ms) against throughput (OK requests/s), one point per level
    that answered anything, labelled with the level; chat adds TTFT and ITL beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    plotted = [row for row in rows if row["latency_ms"] is not None]
    panels = [("latency_ms", "request latency (ms)")]
    if workload == "chat":
        panels += [("ttft_ms", "time to first piece (ms)"), ("itl_ms", "between pieces (ms)")]
    figure = Figure(figsize=(5.5 * len(panels) + 1, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (key, label) in zip(axes_list, panels, strict=True):
        throughput = [row["throughput"]["requests_per_s"] for row in plotted]
        for percentile in PLOTTED:
            values = [_get(row, key, percentile) for row in plotted]
            points = [(x, y) for x, y in zip(throughput, values, strict=True) if y is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", label=percentile)
        if key == "latency_ms":
            for row, x in zip(plotted, throughput, strict=True):
                axes.annotate(
                    str(row["level"]), (x, row["latency_ms"]["p50"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8,
                )  # fmt: skip
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        axes.tick_params(axis="y", which="minor", labelsize=7)
        unit = "turns" if workload == "chat" else "requests"
        axes.set_xlabel(f"throughput ({unit}/s, OK)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:
            axes.legend()
    if not plotted:
        axes_list[0].text(0.5, 0.5, "no level answered any request", ha="center",
                          transform=axes_list[0].transAxes)  # fmt: skip
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)

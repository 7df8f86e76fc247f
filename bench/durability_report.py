"""The table bench/durability.py prints last, from its JSON record: medians over the rounds,
the commit costs, the bytes, recovery, and the verdicts."""

from __future__ import annotations

from typing import Any

from bench.durability_servers import CONFIGS
from bench.durability_throughput import SHAPES
from bench.serving import median_of, verdict


def print_table(record: dict[str, Any]) -> None:
    print_throughput(record)
    print_commit_costs(record.get("commit_costs"))
    print_record_bytes(record.get("record_bytes"))
    for result in record.get("recovery", []):
        print_restart(result)
    print_flush(record.get("flush"))
    print_targets(record.get("targets", {}))


def print_throughput(record: dict[str, Any]) -> None:
    levels = record.get("levels", [])
    if not levels:
        return
    print(
        "\nthroughput, median over rounds (session-steps/s; latency per call in ms; "
        "ratio: median of the rounds' store / memory)"
    )
    print(
        f"{'shape':>9} {'C':>4} {'store':>14} | {'steps/s':>9} {'p50':>8} {'p99':>8} | "
        f"{'ratio':>5} {'rounds':<24} {'batch':>5} {'store cpu':>9}"
    )
    for shape, concurrency in zip(SHAPES, record["settings"]["concurrency"], strict=True):
        for config in CONFIGS:
            rows = [r for r in levels if (r["config"], r["shape"]) == (config.name, shape.name)]
            ratios = [by_config[config.name][shape.name] for by_config in record["ratios"]]
            rate = median_of([r["session_steps_per_s"] for r in rows])
            p50 = median_of([r["latency_us"]["p50"] for r in rows]) / 1e3
            p99 = median_of([r["latency_us"]["p99"] for r in rows]) / 1e3
            batch = median_of(
                [(r["batching"] or {}).get("mean_batch_size", float("nan")) for r in rows]
            )
            store_cpu = median_of([r["store_cpu_seconds"] / r["seconds"] for r in rows])
            flag = "" if all(r["ok"] for r in rows) else "  ERRORS"
            if any(r["other_servers_sessions"] for r in rows):
                flag += "  NOT ALONE"
            print(
                f"{shape.name:>9} {concurrency:>4} {config.name:>14} | {rate:>9.1f} "
                f"{p50:>8.2f} {p99:>8.2f} | {median_of(ratios):>5.3f} "
                f"{' '.join(f'{x:.2f}' for x in ratios):<24} {batch:>5.1f} "
                f"{store_cpu:>9.2f}{flag}"
            )


def print_flush(flush: dict[str, Any] | None) -> None:
    if not flush:
        return
    print(
        f"\nflush: memory's server at {flush['shape']} beside another process's fdatasyncs "
        f"({flush['flush_bytes']} B appended before each), ratio to none in the same round"
    )
    for rate in flush["rates"]:
        rows = [level for level in flush["levels"] if level["flusher"]["rate"] == rate]
        steps = median_of([row["session_steps_per_s"] for row in rows])
        ratios = [by_rate[str(rate)] for by_rate in flush["ratios"]]
        achieved = median_of([row["flusher"].get("achieved_per_s", 0.0) for row in rows])
        p50 = median_of([row["flusher"].get("fdatasync", {}).get("p50_us", 0.0) for row in rows])
        print(
            f"  {rate:>4} fdatasyncs/s (made {achieved:6.1f}/s, p50 {p50:7.1f} us): "
            f"{steps:9.1f} steps/s, ratio {flush['median_ratio'][str(rate)]:.3f} "
            f"(rounds {' '.join(f'{x:.2f}' for x in ratios)})"
        )


def print_commit_costs(costs: dict[str, Any] | None) -> None:
    if not costs:
        return
    print("\ncommit costs (microseconds, p50 / p99)")
    for row in costs["appends"]:
        print(
            f"  write + fdatasync {row['bytes']:>7} B: {row['p50_us']:>9.0f} {row['p99_us']:>9.0f}"
        )
    for row in costs["dir_commit"]:
        print(
            f"  dir: commit {row['launch']:>11} ({row['bytes']:>7} B): "
            f"{row['p50_us']:>9.0f} {row['p99_us']:>9.0f}"
        )
    for appendfsync, redis_costs in costs["redis"].items():
        ping, set_ = redis_costs["ping"], redis_costs["set_100_bytes"]
        print(
            f"  redis appendfsync {appendfsync}: ping {ping['p50_us']:.0f} / "
            f"{ping['p99_us']:.0f}, set 100 B {set_['p50_us']:.0f} / {set_['p99_us']:.0f}"
        )
        for row in redis_costs["commit"]:
            print(
                f"    commit {row['launch']:>11} ({row['bytes']:>7} B): "
                f"{row['p50_us']:>9.0f} {row['p99_us']:>9.0f}"
            )


def print_record_bytes(sizes: list[dict[str, Any]] | None) -> None:
    if not sizes:
        return
    print("\nbytes: a snapshot against one step's logged command (framed records)")
    for row in sizes:
        steps = ", ".join(f"{kind} {size}" for kind, size in row["step_record_bytes"].items())
        print(
            f"  {row['model']:>10}: state {row['state_bytes']}, snapshot "
            f"{row['snapshot_record_bytes']}, one step ({steps}), per step in a call "
            f"of 20 {row['bytes_per_step_in_a_call_of_20']:.1f}; snapshot / step "
            f"{row['snapshot_over_step']:.0f}x"
        )


def print_restart(result: dict[str, Any]) -> None:
    restart, opened = result["restart"], result["open_in_process"]
    print(
        f"\nrecovery {result['store']}: {result['sessions']} sessions x "
        f"{result['calls_per_session']} calls, store {result['store_bytes'] / 1e6:.1f} MB; "
        f"new process to serving {restart['to_serving_s']:.2f} s (model loaded "
        f"{restart['to_model_loaded_s']:.2f}, store opened {restart['to_store_opened_s']:.2f};"
        f" empty store: {result['start_empty']['to_serving_s']:.2f}); store opened and "
        f"listed in-process {opened['open_s'] + opened['list_s']:.2f} s; first call on "
        f"each at C={result['concurrency']}: {result['first_calls']['seconds']:.2f} s"
        + (" (STALLED)" if result["first_calls"]["stalled"] else "")
        + (
            f", then a second: {result['second_calls']['seconds']:.2f} s"
            if result.get("second_calls")
            else ""
        )
    )


def print_targets(targets: dict[str, Any]) -> None:
    if targets:
        print("\ntargets (throughput: each ratio per round, decided on the median)")
    for config, result in targets.get("throughput", {}).items():
        for shape, decided in result["shapes"].items():
            rounds = " ".join(f"{ratio:.3f}" for ratio in decided["rounds"])
            print(
                f"  {config} / memory, {shape}: median {decided['median']:.3f} "
                f"(>= {decided['threshold']}: {verdict(decided['pass'])}); rounds {rounds}"
            )
        print(f"  {config}: {verdict(result['pass'])}")
    recovery = targets.get("recovery")
    if recovery:
        for kind, decided in recovery["stores"].items():
            whole = decided["all_sessions_known"] and decided["first_calls_correct"]
            print(
                f"  recovery {kind}: start to serving {decided['to_serving_s']:.2f} s "
                f"(store opened {decided['store_open_s']:.2f} s, adopted "
                f"{decided['adopt_s']:.2f} s; < "
                f"{recovery['threshold_s']:g} s and every session back: "
                f"{verdict(decided['pass'])}{'' if whole else ', SESSIONS LOST OR WRONG'}); "
                f"first call on every session {decided['first_calls_s']:.2f} s"
            )

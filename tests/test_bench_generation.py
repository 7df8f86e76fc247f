"""bench/generation.py stays runnable: a tiny run of chats against a real server with a small
random VMED writes a consistent JSON record. Speed is not asserted (GUIDE: timing targets
live in benchmarks, never in timed tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import generation as bench
from tests.tiny_vmed import tiny_vmed as make_tiny_vmed

MAX_TOKENS = 6


def tiny_vmed(directory: Path) -> Path:
    """The small VMED of tests/tiny_vmed.py (it never says <eos>: every reply is full)."""
    return make_tiny_vmed(directory / "vmed-bench-tiny")[0]


def test_user_texts_are_the_first_utterance_of_each_exchange(tmp_path: Path) -> None:
    corpus = tmp_path / "dialogues.txt"
    corpus.write_text(
        "1 your persona: i like cats.\n2 hi there !\thello .\n3 how are you ?\tfine .\n"
    )
    assert bench.user_texts(corpus) == ["hi there !", "how are you ?"]


@pytest.mark.timeout(120)
def test_tiny_run_writes_a_consistent_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_vmed(tmp_path)
    out = tmp_path / "generation.json"
    argv = ["--model", str(model), "--levels", "2", "1", "--seconds", "0.5", "--warmup", "0.3",
            "--rounds", "2", "--max-tokens", str(MAX_TOKENS), "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens/s C=2 / C=1" in printed

    record = json.loads(out.read_text())
    assert record["benchmark"] == "generation"
    assert record["command"] == "python bench/generation.py " + " ".join(argv)
    assert record["cores"] >= 1 and record["device"]
    assert set(record["versions"]) >= {"python", "torch", "grpcio", "protobuf"}
    assert record["model"]["name"] == "vmed-bench-tiny" and record["model"]["type"] == "vmed"
    settings = record["settings"]
    assert settings["levels"] == [1, 2] and settings["seconds"] == 0.5 and settings["rounds"] == 2
    assert (settings["max_tokens"], settings["temperature"], settings["top_p"]) == (
        MAX_TOKENS, 1.0, 0.9,
    )  # fmt: skip
    assert settings["server_command"][-2:] == ["--max-new-tokens", "256"]

    # Ascending C in round 1, descending in round 2.
    assert [(row["round"], row["concurrency"]) for row in record["levels"]] == [
        (1, 1), (1, 2), (2, 2), (2, 1),
    ]  # fmt: skip
    levels = {(row["round"], row["concurrency"]): row for row in record["levels"]}
    for (_, concurrency), row in levels.items():
        assert row["errors"] == {} and row["ok"], row
        assert row["seconds"] == pytest.approx(0.5)
        assert row["calls"] > 0
        assert row["finish_reasons"] == {"length": row["calls"]}  # <eos> is never sampled
        assert row["completion_tokens"] == row["calls"] * MAX_TOKENS
        assert row["prompt_tokens"] >= 2 * row["calls"]  # at least a word and <eos>
        assert row["tokens_per_s"] == pytest.approx(row["completion_tokens"] / row["seconds"])
        assert row["calls_per_s"] == pytest.approx(row["calls"] / row["seconds"])
        # Every counted call has a latency and a first piece. A call's pieces may all come
        # as one (the detokenizer holds back what is not yet text), so a short window can
        # hold no inter-token gap: those are checked where there are some.
        assert row["ttft_samples"] > 0 and row["ttft_mean_us"] > 0
        histograms = ["ttft_us", "call_us"] + (["itl_us"] if row["itl_samples"] else [])
        for name in histograms:
            latency = row[name]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"], (
                name,
                row,
            )
        assert row["server_cpu_seconds"] > 0 and row["client_cpu_seconds"] > 0
        # The host's share of the machine's time, from a counter that only grows. (No upper
        # bound: a hypervisor may credit a long steal at once, beyond a short window.)
        assert row["stolen_cpu_seconds"] >= 0
        batching = row["batching"]
        assert batching["launches"] > 0
        assert 1 <= batching["mean_batch_size"] <= concurrency
        assert row["server_generated_tokens"] > 0
        assert row["backends"] == {"vmed-bench-tiny": "torch"}  # no fused step for a VMED

    for n, targets in enumerate(record["rounds"], start=1):  # each round's own numbers
        scaling = targets["scaling"]
        assert (scaling["concurrency_high"], scaling["concurrency_low"]) == (2, 1)
        assert scaling["tokens_per_s_high"] == levels[(n, 2)]["tokens_per_s"]
        assert scaling["tokens_per_s_low"] == levels[(n, 1)]["tokens_per_s"]
        assert scaling["ratio"] == pytest.approx(
            levels[(n, 2)]["tokens_per_s"] / levels[(n, 1)]["tokens_per_s"]
        )
    verdict = record["targets"]["scaling"]
    ratios = [targets["scaling"]["ratio"] for targets in record["rounds"]]
    assert (verdict["concurrency_high"], verdict["concurrency_low"]) == (2, 1)
    assert verdict["rounds"] == pytest.approx(ratios)
    assert verdict["median"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert verdict["threshold"] == 10.0
    assert verdict["pass"] == (verdict["median"] >= 10)

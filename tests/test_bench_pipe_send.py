"""bench/pipe_send.py stays runnable: a tiny run writes a record with both ways of sending
for every shape. Speed is not asserted (the benchmark reports it)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import pipe_send as bench


def test_tiny_run_writes_a_consistent_record(tmp_path: Path) -> None:
    out = tmp_path / "pipe-send.json"
    argv = ["--sends", "20", "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "python bench/pipe_send.py " + " ".join(argv)
    assert record["sends"] == 20 and [row["shape"] for row in record["rows"]] == list(bench.SHAPES)
    for row, (rows, steps) in zip(record["rows"], bench.SHAPES.values(), strict=True):
        assert row["bytes"] > rows * steps * 9 * 4  # the inputs, and the frame around them
        for way in bench.WAYS:
            assert len(row[way]["repeats_us"]) == 1 and all(t >= 0 for t in row[way]["repeats_us"])

"""What writing one request to a model's process costs the server's thread: the framed,
never-blocking write the server uses (`serving.protocol.frame`, `socket.sendmsg` with
MSG_DONTWAIT; what the socket cannot take yet is written when it can) against the blocking
`multiprocessing.connection.Connection.send` it replaced.

A spawned process reads every request (as the model's process does, `read_frame`, or
`Connection.recv` for the old way); the sender's CPU time (`time.process_time`) over
`--sends` launches of a T = 1 shape (13 rows, one step: the mean launch of `ntm-copy` at
C = 64 in docs/performance.md) and of a T = 20 shape (100 rows of 8 steps), median of
`--repeats`. Bytes the socket refused are sent blocking here, outside what is compared:
the server would keep them for the event loop.

    python bench/pipe_send.py --out bench/results/pipe-send.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import provenance, write_record  # noqa: E402
from serving.protocol import Launch, StepBatch, frame, read_frame  # noqa: E402

SHAPES = {"T=1, 13 rows": (13, 1), "T=20, 100 rows of 8 steps": (100, 8)}
WAYS = ("framed, never blocking", "Connection.send")


def launch(rows: int, steps: int) -> Launch:
    slots = np.arange(rows, dtype=np.int64)
    inputs = np.zeros((rows, steps, 9), np.float32)
    return Launch((StepBatch(slots, inputs, np.full(rows, steps, np.int64)),))


def read_all(connection: Connection, count: int, framed: bool) -> None:
    source = socket.socket(fileno=os.dup(connection.fileno()))
    for _ in range(count):
        read_frame(source) if framed else connection.recv()


def sender_cpu_us(request: Launch, sends: int, framed: bool) -> float:
    """Microseconds of this process's CPU a send, with a reader process at the other end."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    reader = context.Process(target=read_all, args=(theirs, sends, framed))
    reader.start()
    out = socket.socket(fileno=os.dup(ours.fileno()))
    spent = 0.0
    for _ in range(sends):
        began = time.process_time()
        if framed:
            parts = frame(request)
            try:
                sent = out.sendmsg(parts, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            spent += time.process_time() - began
            if sent < len(parts[0]) + len(parts[1]):
                out.sendall(b"".join(parts)[sent:])
        else:
            ours.send(request)
            spent += time.process_time() - began
    reader.join()
    out.close()
    return spent / sends * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=3000, help="requests a repeat sends")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each (median)")
    parser.add_argument("--out", type=Path, help="write the record as JSON here")
    args = parser.parse_args(argv)
    record = provenance("pipe_send", "bench/pipe_send.py", list(argv or sys.argv[1:]))
    record["sends"], record["rows"] = args.sends, []
    for shape, (rows, steps) in SHAPES.items():
        request = launch(rows, steps)
        row: dict[str, object] = {"shape": shape, "bytes": sum(map(len, frame(request)))}
        for way in WAYS:
            repeats = [
                sender_cpu_us(request, args.sends, framed=way == WAYS[0])
                for _ in range(args.repeats)
            ]
            row[way] = {"median_us": statistics.median(repeats), "repeats_us": repeats}
        record["rows"].append(row)
        print(
            f"{shape} ({row['bytes']} B): "
            + ", ".join(f"{way} {row[way]['median_us']:.1f} us" for way in WAYS),  # type: ignore[index]
            flush=True,
        )
    if args.out:
        write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

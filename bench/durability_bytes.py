"""Part 3 of bench/durability.py: bytes. For each bundled model, a framed snapshot of a
session's state against one step's logged command (a call record of one operation), as the
stores write them: the numbers behind command logging with periodic snapshots.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np


def record_sizes() -> list[dict[str, Any]]:
    """For each bundled model: the framed snapshot of a session's state, and one step's
    logged command (a call record of one operation), as the stores write them."""
    from models import checkpoint
    from protos import journal_pb2, memserve_pb2, tensors
    from serving.durable.records import frame, operation_record
    from serving.export import export_state
    from serving.protocol import BeginRow, DecodeRow, Operation

    session_id, digest, step = secrets.token_hex(16), "0" * 64, 1024
    rng = np.random.default_rng(0)
    rows = []
    for name in ("ntm-copy", "dnc-recall", "vmed-chat"):
        model = checkpoint.load(name)
        pool = model.new_pool(1)
        model.reset(pool, range(1))
        state = pool.read(0)
        snapshot = journal_pb2.Record(
            snapshot=journal_pb2.Snapshot(
                session_id=session_id,
                step=step,
                state=export_state(state, name, digest, step),
            )
        )
        operations: dict[str, Any]
        if name == "vmed-chat":  # a Generate turn's steps: prompt tokens, a begin, decodes
            latent = int(getattr(model, "config").latent_size)  # noqa: B009 - VMED only
            noise = rng.standard_normal(latent).astype(np.float32)
            operations = {
                "encode": operation_record(Operation.ENCODE, 1234),
                "decode": operation_record(Operation.DECODE, DecodeRow(1234, 0.0, 0, 1.0, 0.0)),
                "begin": operation_record(Operation.BEGIN, BeginRow(noise, 0.5)),
            }
        else:
            row = (rng.random(model.input_size) > 0.5).astype(np.float32)
            operations = {"step": operation_record(Operation.STEP, row)}

        def call(operation: Any, steps: int, output: int = 0) -> int:
            record = journal_pb2.CallCommitted(
                session_id=session_id,
                from_step=step,
                to_step=step + steps,
                operations=[operation] * steps,
            )
            if output:  # a request id's answer: [T, output] float32 outputs
                answer = memserve_pb2.StepResponse(step=step + steps)
                tensors.encode_into(answer.outputs, np.zeros((steps, output), np.float32))
                record.response.CopyFrom(
                    journal_pb2.Response(
                        request_id=secrets.token_hex(16), request_digest=bytes(32), step=answer
                    )
                )
            return len(frame(journal_pb2.Record(call=record)))

        first = next(iter(operations.values()))
        row_record: dict[str, Any] = {
            "model": name,
            "state_bytes": int(model.state_bytes),
            "snapshot_record_bytes": len(frame(snapshot)),
            "step_record_bytes": {kind: call(op, 1) for kind, op in operations.items()},
            "bytes_per_step_in_a_call_of_20": call(first, 20) / 20,
        }
        if name != "vmed-chat":
            row_record["step_record_bytes_with_request_id"] = call(first, 1, model.output_size)
        row_record["snapshot_over_step"] = (
            row_record["snapshot_record_bytes"]
            / row_record["step_record_bytes"][next(iter(operations))]
        )
        rows.append(row_record)
    return rows

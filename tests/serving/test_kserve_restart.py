"""A v2 sequence lives as long as its session: on a durable store a sequence started before
the server is killed with SIGKILL goes on by its name after the restart, bit for bit, and one
that ended stays ended."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bench.child_server import ServerProcess
from tests.serving.client import create, step

ARGS = ("--models", "ntm-copy", "--max-steps-per-call", "64")


def steps_input(inputs: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("INPUT", list(inputs.shape), "FP32")
    tensor.set_data_from_numpy(inputs)
    return tensor


def connect(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.target, channel_args=[("grpc.enable_http_proxy", 0)])


def test_a_sequence_goes_on_by_its_name_after_kill_9(tmp_path: Path) -> None:
    store = f"dir:{tmp_path / 'store'}"
    rng = np.random.default_rng(19)
    chunks = [rng.random((3, 9), np.float32) for _ in range(3)]
    names: list[int | str] = ["durable", 77]
    with ServerProcess(tmp_path, "--store", store, *ARGS) as first, connect(first) as client:
        for name in names:
            for index, chunk in enumerate(chunks[:2]):
                client.infer("ntm-copy", [steps_input(chunk)], sequence_id=name,
                             sequence_start=index == 0)  # fmt: skip
        client.infer("ntm-copy", [steps_input(chunks[0])], sequence_id="ended",
                     sequence_start=True, sequence_end=True)  # fmt: skip
        first.signal(signal.SIGKILL)  # nothing drained, nothing flushed
        first.wait()
    with ServerProcess(tmp_path, "--store", store, *ARGS) as second, connect(second) as client:
        stub = second.stub()
        reference = create(stub)
        for chunk in chunks:
            expected, count = step(stub, reference, chunk)
        for name in names:
            result = client.infer("ntm-copy", [steps_input(chunks[2])], sequence_id=name,
                                  sequence_end=True)  # fmt: skip
            assert np.array_equal(result.as_numpy("OUTPUT"), expected), name
            assert result.as_numpy("STEP").tolist() == [count] == [9]
        try:
            client.infer("ntm-copy", [steps_input(chunks[0])], sequence_id="ended")
        except InferenceServerException as error:
            assert "must specify the START flag" in error.message()
        else:
            raise AssertionError("an ended sequence answered after the restart")

"""The v2 inference API (KServe v2 with Triton's sequence extension) through Triton's own
client, `tritonclient.grpc`, against a real server: metadata, a copy-task sequence bit for
bit equal to memserve.v1's Step, 32 sequences on one stream, a dialogue turn streamed, every
refusal with its message, and sessions shared between v1 and v2."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.utils import InferenceServerException

from bench.child_server import ServerProcess
from models.tasks.copy import copy_batch
from protos import memserve_pb2
from protos.memserve_pb2_grpc import MemServeStub
from tests.serving.client import create, info, metric, scrape, step
from tests.tiny_vmed import tiny_vmed

MODEL, CHAT = "ntm-copy", "vmed-tiny"
MAX_STEPS = 64
INVALID = "StatusCode.INVALID_ARGUMENT"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    chat, _ = tiny_vmed(tmp_path_factory.mktemp("model") / CHAT)
    with ServerProcess(
        tmp_path_factory.mktemp("server"), "--models", f"{MODEL},{chat}",
        "--max-new-tokens", "24", "--max-steps-per-call", str(MAX_STEPS),
    ) as process:  # fmt: skip
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(
        server.target, channel_args=[("grpc.enable_http_proxy", 0)]
    ) as connection:
        yield connection


@pytest.fixture
def stub(server: ServerProcess) -> MemServeStub:
    return server.stub()


class Stream:
    """A tritonclient stream whose callback puts every (result, error) on a queue."""

    def __init__(self, client: triton.InferenceServerClient) -> None:
        self.client = client
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def next(self) -> tuple[Any, Any]:
        return self.results.get(timeout=60)

    def close(self) -> None:
        self.client.stop_stream()


def steps_input(inputs: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("INPUT", list(inputs.shape), "FP32")
    tensor.set_data_from_numpy(inputs)
    return tensor


def text_input(text: str) -> triton.InferInput:
    tensor = triton.InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def copy_sequence(seed: int, length: int = 6) -> np.ndarray:
    """One copy-task sequence `[2 * length + 1, 9]`: the bits, the delimiter, blanks."""
    generator = torch.Generator().manual_seed(seed)
    return copy_batch(1, length, length, generator).inputs[0].numpy()


def parameters(result: Any) -> Any:
    return result.get_response().parameters


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


# ---------------------------------------------------------------------- metadata


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(CHAT, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server.name == "memserve" and "sequence" in server.extensions
    assert "sequence(string_id)" in server.extensions
    steps = client.get_model_metadata(MODEL, as_json=True)
    assert steps["versions"] == ["1"]
    assert steps["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": ["-1", "9"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in steps["outputs"]] == [
        ("OUTPUT", "FP32", ["-1", "8"]), ("STEP", "INT64", ["1"]),
    ]  # fmt: skip
    chat = client.get_model_metadata(CHAT, as_json=True)
    assert [(t["name"], t["datatype"]) for t in chat["inputs"]] == [("TEXT", "BYTES")]
    assert [(t["name"], t["datatype"]) for t in chat["outputs"]] == [
        ("REPLY", "BYTES"), ("STEP", "INT64"),
    ]  # fmt: skip
    config = client.get_model_config(MODEL).config
    assert config.max_batch_size == 0 and config.HasField("sequence_batching")
    assert not config.model_transaction_policy.decoupled
    assert client.get_model_config(CHAT).config.model_transaction_policy.decoupled
    for call in (lambda: client.get_model_metadata("nope"),
                 lambda: client.get_model_metadata(MODEL, "2")):  # fmt: skip
        error = refused(call)
        assert error.status() == "StatusCode.NOT_FOUND" and "unknown model" in error.message()


def test_health_reflection_and_what_memserve_does_not_implement(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(channel)
    assert {"inference.GRPCInferenceService", "memserve.v1.MemServe"} <= set(
        database.get_services()
    )
    found = database.FindFileContainingSymbol("inference.GRPCInferenceService")
    assert found.name == "protos/inference/grpc_service.proto"
    error = refused(client.get_model_repository_index)
    assert error.status() == "StatusCode.UNIMPLEMENTED"


# ---------------------------------------------------------------------- sequences


def test_a_copy_sequence_gives_v1s_outputs_bit_for_bit(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    """Step by step with sequence_start/end, in both accepted shapes, as Step would."""
    inputs = copy_sequence(seed=1)
    chunks = [inputs[:1], inputs[1:6], inputs[6:]]
    session_id = create(stub)
    for index, chunk in enumerate(chunks):
        first, last = index == 0, index == len(chunks) - 1
        sent = chunk[None] if first else chunk  # [1, T, 9] with the batch axis, else [T, 9]
        result = client.infer(MODEL, [steps_input(sent)], sequence_id=101,
                              sequence_start=first, sequence_end=last)  # fmt: skip
        expected, count = step(stub, session_id, chunk)
        outputs = result.as_numpy("OUTPUT")
        assert outputs.shape == ((1, *expected.shape) if first else expected.shape)
        assert np.array_equal(outputs.reshape(expected.shape), expected)
        assert result.as_numpy("STEP").tolist() == [count]
        assert ("memserve_session_id" in parameters(result)) == first
    error = refused(lambda: client.infer(MODEL, [steps_input(inputs[:1])], sequence_id=101))
    assert error.status() == INVALID
    assert "must specify the START flag on the first request of the sequence" in error.message()
    assert "was deleted" in error.message()


def test_32_sequences_on_one_stream_with_string_and_integer_ids(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    """Every request of every sequence sent at once, interleaved; each sequence's answers
    in its order, equal to the same calls through v1."""
    rounds, rng = 4, np.random.default_rng(32)
    names: list[int | str] = [f"stream-{i}" if i % 2 else 3200 + i for i in range(32)]
    inputs = {name: rng.random((rounds, 2, 9), dtype=np.float32) for name in names}
    stream = Stream(client)
    try:
        for r in range(rounds):
            for name in names:
                client.async_stream_infer(
                    MODEL, [steps_input(inputs[name][r])], request_id=f"{name}/{r}",
                    sequence_id=name, sequence_start=r == 0, sequence_end=r == rounds - 1,
                )  # fmt: skip
        answers: dict[str, list[Any]] = {}
        for _ in range(rounds * len(names)):
            result, error = stream.next()
            assert error is None, error
            request_id = result.get_response().id
            answers.setdefault(request_id.rsplit("/", 1)[0], []).append(result)
            assert parameters(result)["triton_final_response"].bool_param
    finally:
        stream.close()
    for name in names:
        session_id = create(stub)
        results = answers[str(name)]
        assert [r.get_response().id for r in results] == [f"{name}/{r}" for r in range(rounds)]
        for r, result in enumerate(results):
            expected, count = step(stub, session_id, inputs[name][r])
            assert np.array_equal(result.as_numpy("OUTPUT"), expected), (name, r)
            assert result.as_numpy("STEP").tolist() == [count]


def stream_turn(stream: Stream) -> tuple[list[str], Any]:
    """The pieces of one streamed reply and its final response."""
    pieces: list[str] = []
    while True:
        result, error = stream.next()
        assert error is None, error
        if parameters(result)["triton_final_response"].bool_param:
            return pieces, result
        pieces.append(result.as_numpy("REPLY")[0].decode())


def test_a_dialogue_turn_streams_piece_by_piece_as_v1_generate(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    text, sampling = "hi , how are you today ?", {"max_tokens": 6, "seed": 11}
    session_id = create(stub, CHAT)
    v1 = list(stub.Generate(memserve_pb2.GenerateRequest(session_id=session_id, text=text,
                                                         max_tokens=6, seed=11)))  # fmt: skip
    v1_pieces, v1_done = [m.text for m in v1 if not m.HasField("done")], v1[-1].done
    stream = Stream(client)
    try:
        client.async_stream_infer(CHAT, [text_input(text)], sequence_id="chat-1",
                                  sequence_start=True, parameters=sampling)  # fmt: skip
        pieces, final = stream_turn(stream)
        client.async_stream_infer(CHAT, [text_input(text)], sequence_id="chat-2",
                                  sequence_start=True, enable_empty_final_response=True,
                                  parameters=sampling)  # fmt: skip
        _, empty_final = stream_turn(stream)
    finally:
        stream.close()
    assert pieces == v1_pieces and "".join(pieces) == v1_done.text
    assert final.as_numpy("REPLY")[0] == b"" and final.as_numpy("STEP").tolist() == [v1_done.step]
    summary = parameters(final)
    assert summary["finish_reason"].string_param == "length"
    assert summary["completion_tokens"].int64_param == 6
    assert empty_final.as_numpy("REPLY") is None and empty_final.as_numpy("STEP") is None
    # The second turn, unary: the whole reply in one response, as v1's second turn (with a
    # presence penalty, as v1's presence_penalty).
    v1_second = list(
        stub.Generate(
            memserve_pb2.GenerateRequest(
                session_id=session_id, text="what do you do ?", max_tokens=5, seed=12,
                presence_penalty=2.0,
            )
        )
    )[-1].done  # fmt: skip
    second_parameters = {"max_tokens": 5, "seed": 12, "presence_penalty": 2.0}
    second = client.infer(CHAT, [text_input("what do you do ?")], sequence_id="chat-1",
                          sequence_end=True, parameters=second_parameters)  # fmt: skip
    assert second.as_numpy("REPLY")[0].decode() == v1_second.text
    assert second.as_numpy("STEP").tolist() == [v1_second.step]


# ---------------------------------------------------------------------- refusals


BAD_STEPS = [
    (triton.InferInput("INPUT", [2, 9], "INT64"), np.ones((2, 9), np.int64), "must be FP32"),
    (triton.InferInput("INPUT", [2, 8], "FP32"), np.ones((2, 8), np.float32),
     "must have shape [T, 9] or [1, T, 9]"),
    (triton.InferInput("INPUT", [2, 2, 9], "FP32"), np.ones((2, 2, 9), np.float32),
     "must have shape [T, 9] or [1, T, 9]"),
    (triton.InferInput("INPUT", [0, 9], "FP32"), np.ones((0, 9), np.float32),
     f"must be between 1 and {MAX_STEPS}, got 0"),
    (triton.InferInput("INPUT", [MAX_STEPS + 1, 9], "FP32"),
     np.ones((MAX_STEPS + 1, 9), np.float32), f"must be between 1 and {MAX_STEPS}"),
    (triton.InferInput("INPUT", [1, 9], "FP32"), np.full((1, 9), np.nan, np.float32), "NaN"),
    (triton.InferInput("TEXT", [1], "BYTES"), np.array([b"x"], np.object_),
     "takes one input, INPUT; got ['TEXT']"),
]  # fmt: skip


@pytest.mark.parametrize(("tensor", "data", "message"), BAD_STEPS)
def test_bad_shapes_and_dtypes_are_refused_and_start_nothing(
    client: triton.InferenceServerClient, tensor: triton.InferInput, data: np.ndarray,
    message: str,
) -> None:  # fmt: skip
    tensor.set_data_from_numpy(data)
    error = refused(lambda: client.infer(MODEL, [tensor], sequence_id="bad", sequence_start=True))
    assert error.status() == INVALID and message in error.message(), error.message()
    never = refused(lambda: client.infer(MODEL, [steps_input(np.ones((1, 9), np.float32))],
                                         sequence_id="bad"))  # fmt: skip
    assert "must specify the START flag" in never.message() and "its session" not in str(never)


@pytest.mark.parametrize(
    ("model", "tensor", "sampling", "message"),
    [
        (CHAT, steps_input(np.ones((1, 9), np.float32)), {}, "takes one input, TEXT"),
        (CHAT, text_input("   "), {}, "text is empty"),
        (CHAT, text_input("hello"), {"temperature": -1.0}, "temperature must be >= 0"),
        (CHAT, text_input("hello"), {"top_p": "high"}, "'top_p' must be a number"),
        (CHAT, text_input("hello"), {"presence_penalty": -1.0}, "presence_penalty must be >= 0"),
        (CHAT, text_input("hello"), {"max_tokens": 99}, "max_tokens must be between 1 and 24"),
    ],
)
def test_bad_dialogue_requests_are_refused(
    client: triton.InferenceServerClient, model: str, tensor: triton.InferInput,
    sampling: dict[str, Any], message: str,
) -> None:  # fmt: skip
    error = refused(lambda: client.infer(model, [tensor], sequence_id="bad-chat",
                                         sequence_start=True, parameters=sampling))  # fmt: skip
    assert error.status() == INVALID and message in error.message(), error.message()


def test_requests_outside_a_sequence_or_for_unknown_ones_are_refused(
    client: triton.InferenceServerClient,
) -> None:
    one = steps_input(np.ones((1, 9), np.float32))
    error = refused(lambda: client.infer(MODEL, [one]))
    assert error.status() == INVALID and "non-zero or non-empty correlation ID" in error.message()
    error = refused(lambda: client.infer(MODEL, [one], sequence_id=987654))
    assert error.message() == (
        "inference request for sequence 987654 to model 'ntm-copy' must specify the START "
        "flag on the first request of the sequence"
    )
    error = refused(lambda: client.infer("nope", [one], sequence_id=1, sequence_start=True))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_a_refused_stream_request_leaves_the_stream_open(
    client: triton.InferenceServerClient,
) -> None:
    stream = Stream(client)
    try:
        client.async_stream_infer(MODEL, [steps_input(np.ones((1, 9), np.float32))],
                                  sequence_id="never-started")  # fmt: skip
        result, error = stream.next()
        assert result is None and f"[{INVALID}]" in str(error)
        assert "must specify the START flag" in str(error)
        client.async_stream_infer(MODEL, [steps_input(np.ones((3, 9), np.float32))],
                                  sequence_id="open", sequence_start=True)  # fmt: skip
        result, error = stream.next()
        assert error is None and result.as_numpy("STEP").tolist() == [3]
    finally:
        stream.close()


# ---------------------------------------------------------------------- v1 and v2 together


def test_a_v2_sequence_is_a_v1_session_and_back(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    rng = np.random.default_rng(5)
    first = client.infer(MODEL, [steps_input(rng.random((3, 9), np.float32))],
                         sequence_id=4242, sequence_start=True)  # fmt: skip
    session_id = parameters(first)["memserve_session_id"].string_param
    assert info(stub, session_id).step == 3
    _, count = step(stub, session_id, rng.random((2, 9), np.float32))
    assert count == 5
    forked = stub.ForkSession(memserve_pb2.ForkSessionRequest(session_id=session_id))
    exported = stub.ExportSession(memserve_pb2.ExportSessionRequest(session_id=session_id))
    assert forked.step == 5 and exported.step == 5
    later = client.infer(MODEL, [steps_input(rng.random((1, 9), np.float32))], sequence_id=4242)
    assert later.as_numpy("STEP").tolist() == [6]
    # A v1 session, named by its id as a string sequence_id, without START.
    v1_session = create(stub)
    for end in (False, True):
        result = client.infer(MODEL, [steps_input(rng.random((2, 9), np.float32))],
                              sequence_id=v1_session, sequence_end=end)  # fmt: skip
    assert result.as_numpy("STEP").tolist() == [4]
    with pytest.raises(grpc.RpcError) as gone:
        info(stub, v1_session)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "deleted" in str(gone.value.details())


def test_a_start_ends_the_sequence_it_interrupts(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    """As Triton: a START for a name still in use ends the sequence that had it."""
    one = steps_input(np.ones((1, 9), np.float32))
    first = client.infer(MODEL, [one], sequence_id="restarted", sequence_start=True)
    second = client.infer(MODEL, [one], sequence_id="restarted", sequence_start=True)
    old, new = (parameters(r)["memserve_session_id"].string_param for r in (first, second))
    assert old != new and info(stub, new).step == 1
    with pytest.raises(grpc.RpcError) as gone:
        info(stub, old)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_repeated_request_id_is_answered_once(
    client: triton.InferenceServerClient, stub: MemServeStub
) -> None:
    inputs = np.random.default_rng(9).random((2, 9), np.float32)

    def send(data: np.ndarray) -> Any:
        return client.infer(MODEL, [steps_input(data)], request_id="once-1",
                            sequence_id="once", sequence_start=True)  # fmt: skip

    first, again = send(inputs), send(inputs)
    assert np.array_equal(first.as_numpy("OUTPUT"), again.as_numpy("OUTPUT"))
    assert again.as_numpy("STEP").tolist() == [2] and again.get_response().id == "once-1"
    session_id = parameters(first)["memserve_session_id"].string_param
    assert parameters(again)["memserve_session_id"].string_param == session_id
    assert info(stub, session_id).step == 2
    error = refused(lambda: send(inputs + 1))
    assert "was used before for a different request" in error.message()


def test_v2_calls_are_metered_by_method(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    client.infer(MODEL, [steps_input(np.ones((1, 9), np.float32))], sequence_id="metered",
                 sequence_start=True, sequence_end=True)  # fmt: skip
    client.is_server_live()
    samples = scrape(server.metrics_url)
    name = "memserve_request_duration_seconds_count"
    assert metric(samples, name, method="ModelInfer", code="OK") >= 1
    assert metric(samples, name, method="ServerLive", code="OK") >= 1

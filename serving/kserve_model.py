"""A model as the v2 API describes it: its tensors, ModelMetadata and ModelConfig
(docs/kserve.md)."""

from __future__ import annotations

from typing import Any

from protos.inference import grpc_service_pb2 as v2
from protos.inference import model_config_pb2
from serving.kserve_wire import INPUT, OUTPUT, REPLY, STEP, TEXT
from serving.protocol import ModelCard


def is_dialogue(card: ModelCard) -> bool:
    return card.text_operations and card.tokenizer_json is not None


def tensors_of(card: ModelCard) -> tuple[list[tuple[str, str, list[int]]], ...]:
    """(inputs, outputs) as (name, datatype, shape), -1 for the time axis."""
    if is_dialogue(card):
        return [(TEXT, "BYTES", [1])], [(REPLY, "BYTES", [1]), (STEP, "INT64", [1])]
    return (
        [(INPUT, "FP32", [-1, card.input_size])],
        [(OUTPUT, "FP32", [-1, card.output_size]), (STEP, "INT64", [1])],
    )


def platform(card: ModelCard) -> str:
    return f"memserve_{card.model_type}"


def model_metadata(name: str, card: ModelCard) -> Any:
    inputs, outputs = tensors_of(card)
    tensor = v2.ModelMetadataResponse.TensorMetadata
    return v2.ModelMetadataResponse(
        name=name,
        versions=["1"],
        platform=platform(card),
        inputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in inputs],
        outputs=[tensor(name=n, datatype=t, shape=s) for n, t, s in outputs],
    )


DATA_TYPES = {
    "FP32": model_config_pb2.TYPE_FP32,
    "INT64": model_config_pb2.TYPE_INT64,
    "BYTES": model_config_pb2.TYPE_STRING,
}


def model_config(name: str, card: ModelCard, idle_seconds: float) -> Any:
    """What Triton clients read of a model's configuration: its tensors, no batch axis of
    Triton's (max_batch_size 0: sequences are batched by the engine), the sequence batcher
    with the session TTL as the idle limit, and decoupled replies for a dialogue model."""
    inputs, outputs = tensors_of(card)
    config = model_config_pb2.ModelConfig(
        name=name, platform=platform(card), backend="memserve", max_batch_size=0
    )
    for n, t, s in inputs:
        config.input.add(name=n, data_type=DATA_TYPES[t], dims=s)
    for n, t, s in outputs:
        config.output.add(name=n, data_type=DATA_TYPES[t], dims=s)
    config.sequence_batching.max_sequence_idle_microseconds = round(idle_seconds * 1e6)
    config.model_transaction_policy.decoupled = is_dialogue(card)
    return v2.ModelConfigResponse(config=config)

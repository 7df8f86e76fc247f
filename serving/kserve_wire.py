"""The v2 API's messages (`protos/inference`) as memserve's values, both ways: a request's
sequence parameters, sampling parameters and input tensors, checked, and a response's output
tensors (what ModelMetadata and ModelConfig say of a model is `serving.kserve_model`).
docs/kserve.md has every mapping. Every error is INVALID_ARGUMENT naming the parameter or
tensor, raised before a session is touched.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as v2
from serving.errors import InvalidArgument
from serving.generation import Sampling
from serving.malformed import Malformed
from serving.requests import check_request_id
from serving.sequences import SequenceId

INPUT, OUTPUT, STEP, TEXT, REPLY = "INPUT", "OUTPUT", "STEP", "TEXT", "REPLY"
FLOAT32 = np.dtype("<f4")
INT64 = np.dtype("<i8")
LENGTH = struct.Struct("<I")  # a BYTES element: its length, little-endian, then its bytes
INT64_MAX = 2**63 - 1
FINAL = "triton_final_response"  # on every stream response: the request's last?


@dataclass(slots=True)  # one per request: cheaper than a frozen one
class Control:
    """The sequence extension's parameters of one request, and Triton's stream flag."""

    sequence_id: SequenceId
    start: bool
    end: bool
    empty_final: bool  # triton_enable_empty_final_response: end a reply with no outputs


def control(parameters: Any, model: str) -> Control:
    """`sequence_id` (int64, uint64 or string; 0 and "" mean none), `sequence_start`,
    `sequence_end`. Every memserve model is stateful: a request outside a sequence is
    refused, with Triton's words."""
    sequence_id: SequenceId = 0
    start = end = empty_final = False
    # Looked up by name (`in` first: reading an absent key of a proto map inserts it).
    if "sequence_id" in parameters:
        sequence_id = _sequence_id(parameters["sequence_id"])
    if "sequence_start" in parameters:
        start = _flag("sequence_start", parameters["sequence_start"])
    if "sequence_end" in parameters:
        end = _flag("sequence_end", parameters["sequence_end"])
    if "triton_enable_empty_final_response" in parameters:
        name = "triton_enable_empty_final_response"
        empty_final = _flag(name, parameters[name])
    if sequence_id in (0, ""):
        raise InvalidArgument(
            f"inference request to model '{model}' must specify a non-zero or non-empty "
            "correlation ID (the sequence_id parameter): memserve's models are stateful"
        )
    return Control(sequence_id, start, end, empty_final)


def _sequence_id(value: Any) -> SequenceId:
    kind = value.WhichOneof("parameter_choice")
    if kind == "string_param":
        text: str = value.string_param
        return text
    if kind in ("int64_param", "uint64_param"):
        number: int = getattr(value, kind)
        if number < 0:
            raise InvalidArgument(f"sequence_id must not be negative, got {number}")
        return number
    raise InvalidArgument(
        "invalid value type for 'sequence_id' parameter, expected int64_param, uint64_param "
        f"or string_param, got {kind}"
    )


def _flag(name: str, value: Any) -> bool:
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"invalid value type for '{name}' parameter, expected bool_param")
    return bool(value.bool_param)


@dataclass(frozen=True)
class SamplingParameters:
    """A dialogue request's sampling parameters, as memserve.v1's GenerateRequest has them
    (0 / None: the default); `Sampling.checked` checks their ranges."""

    max_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None


def sampling_parameters(parameters: Any) -> SamplingParameters:
    def integer(name: str, upper: int = INT64_MAX) -> int | None:
        if name not in parameters:
            return None
        value = parameters[name]
        kind = value.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidArgument(f"parameter '{name}' must be an integer, got {kind}")
        number: int = getattr(value, kind)
        if not 0 <= number <= upper:
            raise InvalidArgument(f"parameter '{name}' must be between 0 and {upper}, got {number}")
        return number

    def real(name: str) -> float | None:
        if name not in parameters:
            return None
        value = parameters[name]
        kind = value.WhichOneof("parameter_choice")
        if kind not in ("double_param", "int64_param", "uint64_param"):
            raise InvalidArgument(f"parameter '{name}' must be a number, got {kind}")
        return float(getattr(value, kind))

    return SamplingParameters(
        max_tokens=integer("max_tokens", 2**31 - 1) or 0,
        temperature=real("temperature"),
        top_k=integer("top_k", 2**31 - 1) or 0,
        top_p=real("top_p"),
        seed=integer("seed", 2**64 - 1),
        presence_penalty=real("presence_penalty"),
    )


@dataclass(frozen=True)
class Turn:
    """A dialogue request's text and sampling."""

    text: str
    sampling: Sampling
    seed: int | None


# ---------------------------------------------------------------------- input tensors


def only_input(request: Any, name: str, model: str) -> tuple[Any, bytes | None]:
    """The request's one input tensor, which must be `name`, with its raw bytes if it came
    in raw_input_contents (None: in its `contents`)."""
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != name:
        got = [tensor.name for tensor in inputs]
        raise InvalidArgument(f"model '{model}' takes one input, {name}; got {got}")
    raw = request.raw_input_contents
    if not raw:
        return inputs[0], None
    if len(raw) != 1:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for 1 input")
    if inputs[0].HasField("contents"):
        raise InvalidArgument(f"input {name} has both contents and raw_input_contents")
    data: bytes = raw[0]
    return inputs[0], data


def step_inputs(request: Any, model: str, width: int, max_steps: int) -> tuple[np.ndarray, bool]:
    """INPUT, FP32 `[T, width]` or `[1, T, width]`, 1 <= T <= max_steps, finite: the array
    `[T, width]` (a read-only view of raw bytes) and whether it came with the batch axis."""
    tensor, raw = only_input(request, INPUT, model)
    if tensor.datatype != "FP32":
        raise InvalidArgument(f"input {INPUT} must be FP32, got {tensor.datatype or 'none'!r}")
    shape = list(tensor.shape)
    batched = len(shape) == 3 and shape[0] == 1
    dims = shape[1:] if batched else shape
    if len(dims) != 2 or dims[1] != width:
        raise InvalidArgument(
            f"input {INPUT} must have shape [T, {width}] or [1, T, {width}] (T steps of this "
            f"model's input), got {shape}"
        )
    steps = dims[0]
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(
            f"input {INPUT}: T (the number of steps) must be between 1 and {max_steps}, got {steps}"
        )
    if raw is None:
        array = np.asarray(tensor.contents.fp32_contents, dtype=FLOAT32)
        where, size = "contents.fp32_contents", len(array)
        if size != steps * width:
            raise InvalidArgument(
                f"input {INPUT} has {size} values in {where}; shape {shape} needs {steps * width}"
            )
    else:
        if len(raw) != steps * width * FLOAT32.itemsize:
            raise InvalidArgument(
                f"input {INPUT} has {len(raw)} bytes in raw_input_contents; shape {shape} of "
                f"FP32 needs {steps * width * FLOAT32.itemsize}"
            )
        array = np.frombuffer(raw, FLOAT32)
    array = array.reshape(steps, width)
    if not np.isfinite(array).all():
        raise InvalidArgument(f"input {INPUT} holds NaN or Inf")
    return array, batched


def text_input(request: Any, model: str) -> str:
    """TEXT, BYTES `[1]` (or `[1, 1]`): one UTF-8 string."""
    tensor, raw = only_input(request, TEXT, model)
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input {TEXT} must be BYTES, got {tensor.datatype or 'none'!r}")
    shape = list(tensor.shape)
    if shape not in ([1], [1, 1]):
        raise InvalidArgument(f"input {TEXT} must have shape [1] (one string), got {shape}")
    if raw is None:
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != 1:
            raise InvalidArgument(f"input {TEXT} has {len(elements)} strings; shape [1] needs 1")
        data = elements[0]
    else:
        if len(raw) < LENGTH.size or LENGTH.unpack_from(raw)[0] != len(raw) - LENGTH.size:
            raise InvalidArgument(
                f"input {TEXT}: raw_input_contents must hold one string as a 4-byte "
                "little-endian length and that many bytes"
            )
        data = raw[LENGTH.size :]
    try:
        text: str = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"input {TEXT} is not UTF-8: {error}") from error
    return text


# ---------------------------------------------------------------------- output tensors


def wanted_outputs(request: Any, available: tuple[str, ...], model: str) -> tuple[str, ...]:
    """The outputs the request asks for (all when it names none), in the model's order."""
    if not request.outputs:
        return available
    names = {output.name for output in request.outputs}
    unknown = sorted(names.difference(available))
    if unknown:
        raise InvalidArgument(f"model '{model}' has no output {unknown[0]} (it has {available})")
    return tuple(name for name in available if name in names)


@functools.lru_cache(maxsize=1024)
def _tensor(name: str, datatype: str, shape: tuple[int, ...]) -> Any:
    """An output's description, built once per shape (appending a copy is cheaper)."""
    return v2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)


def add_fp32(response: Any, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    response.outputs.append(_tensor(name, "FP32", shape))
    response.raw_output_contents.append(np.ascontiguousarray(array, FLOAT32).tobytes())


def add_int64(response: Any, name: str, value: int) -> None:
    response.outputs.append(_tensor(name, "INT64", (1,)))
    response.raw_output_contents.append(INT64.type(value).tobytes())


def add_text(response: Any, name: str, text: str) -> None:
    data = text.encode("utf-8")
    response.outputs.append(_tensor(name, "BYTES", (1,)))
    response.raw_output_contents.append(LENGTH.pack(len(data)) + data)


# ---------------------------------------------------------------------- requests


def request_key(request: Any) -> tuple[str, bytes]:
    """A request's `id` and the SHA-256 of everything else it asks, so that a repeat with
    other contents is told apart; ("", b"") without an id."""
    request_id: str = request.id
    if not request_id:
        return "", b""
    check_request_id(request_id)
    payload = v2.ModelInferRequest()
    payload.CopyFrom(request)
    payload.ClearField("id")
    return request_id, hashlib.sha256(payload.SerializeToString(deterministic=True)).digest()


def order_key(request: Any) -> Hashable | None:
    """What keeps a stream's requests in order: its model and sequence (None: no sequence,
    refused anyway)."""
    if isinstance(request, Malformed) or "sequence_id" not in request.parameters:
        return None
    value = request.parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        return None
    return request.model_name, kind == "string_param", getattr(value, kind)


def failed(request: Any, message: str) -> Any:
    """A stream's answer to a request that failed: the error, and the request's identity."""
    answer = v2.ModelStreamInferResponse(error_message=message)
    if not isinstance(request, Malformed):
        answer.infer_response.id = request.id
        answer.infer_response.model_name = request.model_name
        answer.infer_response.model_version = request.model_version
    answer.infer_response.parameters[FINAL].bool_param = True
    return answer

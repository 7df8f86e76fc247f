"""What the clients send and get back, as plain Python: requests built from arguments,
replies turned into dataclasses, and step tensors converted between numpy or torch and the
wire (float32). Shared by `Client` and `AsyncClient` (`calls.py` puts them together per RPC).

Torch is optional: a tensor is recognised only when torch is already imported (the caller
made one), so numpy users never load it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, cast

import grpc
import numpy as np

from clients.errors import MemserveError
from protos import memserve_pb2, tensors

if TYPE_CHECKING:
    import torch

# Step inputs and outputs: numpy in gives numpy out, a torch tensor gives a tensor on the
# same device.
Array = TypeVar("Array", np.ndarray, "torch.Tensor")


DIALOGUE_TYPES = ("vmed",)  # model types whose sessions answer Generate


@dataclass(frozen=True)
class ModelInfo:
    """A model the server serves (ListModels)."""

    name: str
    type: str
    input_size: int
    output_size: int
    memory_shape: tuple[int, ...]
    state_bytes: int


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server sees it; `residence`: active, parked_host or parked_disk."""

    session_id: str
    model: str
    step: int
    ttl_seconds: float
    residence: str


@dataclass(frozen=True)
class SessionState:
    """An exported session: `state` is what ImportSession takes back."""

    state: bytes
    model: str
    step: int


@dataclass(frozen=True)
class GenerateDone:
    """How a Generate call ended: finish_reason is "eos", "stop" or "length"; `text` is the
    whole reply; `step` the session's step count afterwards."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str
    step: int


@dataclass(frozen=True)
class Stepped(Generic[Array]):
    """A Step's outputs `[T, output_size]` and the session's step count after it."""

    outputs: Array
    step: int


def model_info(message: memserve_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        type=message.type,
        input_size=message.input_size,
        output_size=message.output_size,
        memory_shape=tuple(message.memory_shape),
        state_bytes=message.state_bytes,
    )


def session_info(message: memserve_pb2.SessionInfo) -> SessionInfo:
    return SessionInfo(
        session_id=message.session_id,
        model=message.model,
        step=message.step,
        ttl_seconds=message.ttl_seconds,
        residence=message.residence,
    )


def session_state(message: memserve_pb2.SessionState) -> SessionState:
    return SessionState(state=message.state, model=message.model, step=message.step)


def generate_done(message: memserve_pb2.GenerateDone) -> GenerateDone:
    return GenerateDone(
        finish_reason=message.finish_reason,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        text=message.text,
        step=message.step,
    )


def _torch_tensor(value: object) -> Any:
    """`value` if it is a torch tensor (torch imported by the caller), else None."""
    torch = sys.modules.get("torch")
    return value if torch is not None and isinstance(value, torch.Tensor) else None


def encode_inputs(inputs: Array) -> memserve_pb2.Tensor:
    """Step inputs as a float32 wire tensor."""
    tensor = _torch_tensor(inputs)
    if tensor is not None:
        array = tensor.detach().to("cpu").float().numpy()
    else:
        array = np.asarray(inputs, dtype=np.float32)
    return tensors.encode(array)


def decode_outputs(message: memserve_pb2.Tensor, like: Array) -> Array:
    """Step outputs as the kind of array `like` is (a torch tensor on its device)."""
    try:
        array = tensors.decode(message, "outputs").astype(np.float32)  # a writable copy
    except ValueError as error:
        raise MemserveError(
            grpc.StatusCode.INTERNAL, f"the server's reply is malformed: {error}"
        ) from None
    tensor = _torch_tensor(like)
    if tensor is not None:
        torch = sys.modules["torch"]
        return cast(Array, torch.from_numpy(array).to(tensor.device))
    return cast(Array, array)


def stepped(response: memserve_pb2.StepResponse, like: Array) -> Stepped[Array]:
    return Stepped(decode_outputs(response.outputs, like), response.step)


def step_request(
    session_id: str, inputs: Array, expected_step: int | None, request_id: str = ""
) -> memserve_pb2.StepRequest:
    """A Step (or StepStream) request; `request_id` names it for retries ("" : none)."""
    return memserve_pb2.StepRequest(
        session_id=session_id,
        inputs=encode_inputs(inputs),
        expected_step=expected_step,
        request_id=request_id,
    )


class Sampling(TypedDict, total=False):
    """Generate's sampling options, all optional: unset ones take the server's defaults
    (max_tokens 0: the server's limit; temperature 1; top_k 0: all tokens; top_p 1; seed: the
    session's; stop: none; presence_penalty 0)."""

    max_tokens: int
    temperature: float | None
    top_k: int
    top_p: float | None
    seed: int | None
    stop: Sequence[str]
    presence_penalty: float | None


def generate_request(
    session_id: str, text: str, sampling: Sampling, request_id: str = ""
) -> memserve_pb2.GenerateRequest:
    """A Generate request; `request_id` names the turn for retries ("": none)."""
    return memserve_pb2.GenerateRequest(
        session_id=session_id,
        text=text,
        request_id=request_id,
        max_tokens=sampling.get("max_tokens", 0),
        temperature=sampling.get("temperature"),
        top_k=sampling.get("top_k", 0),
        top_p=sampling.get("top_p"),
        seed=sampling.get("seed"),
        stop=list(sampling.get("stop", ())),
        presence_penalty=sampling.get("presence_penalty"),
    )


def piece_or_done(message: memserve_pb2.GenerateResponse) -> str | GenerateDone:
    """A Generate stream's message: the next piece of text, or the final summary."""
    if message.HasField("done"):
        return generate_done(message.done)
    text: str = message.text
    return text


def ended_early() -> MemserveError:
    """A Generate stream that closed without its final message."""
    return MemserveError(grpc.StatusCode.INTERNAL, "the reply ended without its final message")

"""The format a session's state travels in (ExportSession / ImportSession): safetensors bytes
whose metadata names the format, the model, the SHA-256 of its weights and the step count."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from serving.errors import InvalidArgument

EXPORT_FORMAT = "memserve-session"
EXPORT_VERSION = 1


def export_state(state: dict[str, torch.Tensor], model: str, model_digest: str, step: int) -> bytes:
    """A session's state as safetensors bytes; the metadata names the model and the step."""
    metadata = {
        "format": EXPORT_FORMAT,
        "version": str(EXPORT_VERSION),
        "model": model,
        "model_digest": model_digest,
        "step": str(step),
    }
    return save_safetensors({n: t.contiguous() for n, t in state.items()}, metadata=metadata)


@dataclass(frozen=True)
class ImportedState:
    tensors: dict[str, torch.Tensor]
    model: str
    model_digest: str
    step: int


def import_state(data: bytes) -> ImportedState:
    """Parse what `export_state` wrote; InvalidArgument naming what is wrong otherwise."""
    if len(data) < 8:
        raise InvalidArgument("state is not a memserve session export (too short)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise InvalidArgument("state is not a memserve session export (bad safetensors header)")
    try:
        header = json.loads(data[8 : 8 + header_size])
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != EXPORT_FORMAT:
            raise InvalidArgument("state is not a memserve session export (no format metadata)")
        if metadata.get("version") != str(EXPORT_VERSION):
            raise InvalidArgument(
                f"state has export version {metadata.get('version')!r}; "
                f"this server reads version {EXPORT_VERSION}"
            )
        step = int(metadata["step"])
        if not 0 <= step < 2**63:
            raise ValueError(f"step {step} is out of range")
        if not metadata.get("model_digest"):
            raise ValueError("it names no model_digest (the weights it was made with)")
        tensors = load_safetensors(data)
        return ImportedState(
            tensors=tensors,
            model=str(metadata["model"]),
            model_digest=str(metadata["model_digest"]),
            step=step,
        )
    except InvalidArgument:
        raise
    except Exception as error:  # any malformation safetensors or json can report
        raise InvalidArgument(f"state is not a readable session export: {error}") from error

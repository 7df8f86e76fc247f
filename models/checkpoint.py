"""Checkpoints: a directory with `config.json` and `model.safetensors`, never a pickle.

`config.json` holds the model type, the format version, every hyperparameter and the
provenance (task, steps, seed, final loss, the command that trained it). A model may keep
more files beside them (`MemoryModel.extra_file_names`: the VMED's `tokenizer.json`), written
and read back with the weights. `load` accepts a directory or the name of a checkpoint bundled
in this package (`models/checkpoints/NAME`), validates everything before building the model,
and raises `CheckpointError` with a message that says what is wrong and where.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from models.base import MemoryModel
from models.dnc import DNC, DNCConfig
from models.locate import CONFIG_FILE as CONFIG_FILE  # re-exported: found here before
from models.locate import CheckpointError as CheckpointError
from models.locate import bundled_dir as bundled_dir
from models.locate import bundled_names as bundled_names
from models.locate import resolve as resolve
from models.ntm import NTM, NTMConfig
from models.vmed import VMED, VMEDConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"

# model_type -> (model class, config class). New models register here.
MODEL_TYPES: dict[str, tuple[Callable[[Any], MemoryModel], type[Any]]] = {
    "ntm": (NTM, NTMConfig),
    "dnc": (DNC, DNCConfig),
    "vmed": (VMED, VMEDConfig),
}


# The JSON value types a hyperparameter of each annotated type accepts.
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
}


def field_type_name(expected: type | tuple[type, ...]) -> str:
    return "a number" if isinstance(expected, tuple) else f"a JSON {expected.__name__}"


def read_config(directory: Path) -> dict[str, Any]:
    """`config.json` of a checkpoint directory, checked for format version and model type."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{config_path}: format_version must be a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format version {version}, newer than this memserve reads "
            f"({FORMAT_VERSION}); upgrade memserve"
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: unknown model_type {model_type!r} (known: {', '.join(MODEL_TYPES)})"
        )
    if not isinstance(config.get("hyperparameters"), dict):
        raise CheckpointError(f"{config_path}: hyperparameters must be a JSON object")
    return config


def build_model(model_type: str, hyperparameters: Mapping[str, Any]) -> MemoryModel:
    """A freshly initialised model of `model_type` from its hyperparameters."""
    model_class, config_class = MODEL_TYPES[model_type]
    types = {field.name: JSON_TYPES.get(str(field.type)) for field in fields(config_class)}
    unknown = sorted(set(hyperparameters) - types.keys())
    if unknown:
        raise CheckpointError(f"unknown {model_type} hyperparameters: {', '.join(unknown)}")
    for name, value in hyperparameters.items():
        expected = types[name]
        wrong_bool = isinstance(value, bool) and expected is not bool
        if expected is not None and (wrong_bool or not isinstance(value, expected)):
            raise CheckpointError(
                f"invalid {model_type} hyperparameters: {name} must be "
                f"{field_type_name(expected)}, got {value!r}"
            )
    try:
        return model_class(config_class(**hyperparameters))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"invalid {model_type} hyperparameters: {error}") from error


def load(path_or_name: str | os.PathLike[str], device: torch.device | str = "cpu") -> MemoryModel:
    """Load a checkpoint directory or a bundled model by name, in eval mode on `device`."""
    directory = resolve(path_or_name)
    config = read_config(directory)
    model = build_model(config["model_type"], config["hyperparameters"])
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        data = weights_path.read_bytes()  # once: for the tensors and for their digest
        tensors = load_safetensors(data)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file: {error}"
        ) from error
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match its config: missing tensors {missing}, "
            f"unexpected tensors {unexpected}"
        )
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"the config needs {want.dtype} {list(want.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights_path}: tensor {name!r} holds NaN or Inf")
    model.load_state_dict(tensors)
    for name in model.extra_file_names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} has no {name}")
        try:
            model.load_extra_file(name, path.read_bytes())
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{path} is not a usable {name}: {error}") from error
    provenance = config.get("provenance")
    model.provenance = dict(provenance) if isinstance(provenance, dict) else {}
    model.weights_digest = hashlib.sha256(data).hexdigest()
    return model.to(device).eval()


def save(
    model: MemoryModel, directory: str | os.PathLike[str], provenance: Mapping[str, Any]
) -> Path:
    """Write `model` as a checkpoint directory; files are replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": model.model_type,
        "hyperparameters": model.hyperparameters(),
        "provenance": dict(provenance),
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    weights_tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, weights_tmp, metadata={"format": "pt", "model_type": model.model_type})
    extra = model.extra_files()
    if sorted(extra) != sorted(model.extra_file_names):
        raise ValueError(
            f"a {model.model_type} checkpoint keeps the files {list(model.extra_file_names)}, "
            f"the model gave {sorted(extra)}"
        )
    for name, data in extra.items():
        (directory / (name + ".tmp")).write_bytes(data)
    config_tmp = directory / (CONFIG_FILE + ".tmp")
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    for name in extra:
        os.replace(directory / (name + ".tmp"), directory / name)
    os.replace(config_tmp, directory / CONFIG_FILE)
    return directory

"""Checkpoints: a round trip keeps the model exactly; every broken checkpoint is named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, load, save
from models.checkpoint import FORMAT_VERSION
from models.ntm import NTM, NTMConfig

CONFIG = NTMConfig(input_size=3, output_size=2, memory_rows=10, memory_width=4, controller_size=8)


@pytest.fixture
def checkpoint(tmp_path: Path, generator: torch.Generator) -> Path:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = NTM(CONFIG)
    with torch.no_grad():
        model.initial_h.normal_(generator=generator)  # saved with the model, not re-made
    return save(model, tmp_path / "ckpt", {"task": "test", "steps": 3})


def test_round_trip_keeps_weights_initial_state_and_provenance(
    checkpoint: Path, generator: torch.Generator
) -> None:
    original = load_file(checkpoint / "model.safetensors")
    model = load(checkpoint)
    assert isinstance(model, NTM)
    assert model.config == CONFIG
    assert not model.training
    assert model.provenance == {"task": "test", "steps": 3}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["model_type"] == "ntm"
    assert config["hyperparameters"]["memory_rows"] == 10
    inputs = torch.randn(2, 5, 3, generator=generator)
    with torch.no_grad():
        assert torch.equal(load(str(checkpoint))(inputs), model(inputs))


def edit_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return edit


def remove(name: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / name).unlink()

    return edit


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / name).write_bytes(data)

    return edit


BROKEN = {
    "missing config": (remove("config.json"), "has no config.json"),
    "missing weights": (remove("model.safetensors"), "has no model.safetensors"),
    "config not JSON": (write("config.json", b"{nope"), "is not valid JSON"),
    "truncated weights": (write("model.safetensors", b"\x10\x00"), "not a readable safetensors"),
    "unknown type": (edit_config("model_type", "lstm"), "unknown model_type 'lstm'"),
    "newer format": (edit_config("format_version", FORMAT_VERSION + 1), "newer than this memserve"),
    "bad format": (edit_config("format_version", "1"), "format_version must be a positive"),
    "unknown hyperparameter": (
        edit_config("hyperparameters", {**CONFIG.__dict__, "depth": 3}),
        "unknown ntm hyperparameters: depth",
    ),
    "invalid hyperparameter": (
        edit_config("hyperparameters", {**CONFIG.__dict__, "memory_rows": 0}),
        "memory_rows must be >= 1",
    ),
    "hyperparameter of the wrong type": (
        edit_config("hyperparameters", {**CONFIG.__dict__, "memory_rows": 8.5}),
        "memory_rows must be a JSON int, got 8.5",
    ),
    "boolean for a number": (
        edit_config("hyperparameters", {**CONFIG.__dict__, "memory_init": True}),
        "memory_init must be a number, got True",
    ),
    "missing tensor": (
        edit_tensors(lambda t: t.__delitem__("output.bias")),
        r"missing tensors \['output.bias'\]",
    ),
    "renamed tensor": (
        edit_tensors(lambda t: t.update(out_bias=t.pop("output.bias"))),
        r"unexpected tensors \['out_bias'\]",
    ),
    "wrong shape": (
        edit_tensors(lambda t: t.update({"output.bias": torch.zeros(3)})),
        r"'output.bias' is torch.float32 \[3\], the config needs torch.float32 \[2\]",
    ),
    "wrong dtype": (
        edit_tensors(lambda t: t.update({"output.bias": torch.zeros(2, dtype=torch.float64)})),
        "'output.bias' is torch.float64",
    ),
    "not finite": (
        edit_tensors(lambda t: t.update({"output.bias": torch.tensor([0.0, float("nan")])})),
        "'output.bias' holds NaN",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_gets_a_clear_error(checkpoint: Path, case: str) -> None:
    breakage, message = BROKEN[case]
    breakage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load(checkpoint)


def test_unknown_names_and_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no bundled model of that name"):
        load("no-such-model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        load(tmp_path / "file")

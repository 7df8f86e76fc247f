"""Where checkpoints are: a directory, or the name of one bundled in this package
(`models/checkpoints/NAME`). Nothing here imports torch, so that `memserve serve` can find its
models and start their processes before it imports torch itself (`serving.startup`)."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing file, unknown type, bad tensors, ..."""


def bundled_dir() -> Path:
    """Where the checkpoints shipped inside the package live."""
    return Path(__file__).resolve().parent / "checkpoints"


def bundled_names() -> list[str]:
    """Names of the bundled checkpoints (`ntm-copy`, ...)."""
    root = bundled_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def resolve(path_or_name: str | os.PathLike[str]) -> Path:
    """The checkpoint directory for a path, or for the name of a bundled checkpoint."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    name = str(path_or_name)
    if name in bundled_names():
        return bundled_dir() / name
    if path.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    raise CheckpointError(
        f"no checkpoint directory {str(path)!r} and no bundled model of that name "
        f"(bundled: {', '.join(bundled_names()) or 'none'})"
    )

"""NTM, DNC and VMED cells: a training forward over whole sequences and a serving step over
a state pool (`models.base`), their per-session state (`models.state`) and checkpoints
(`models.checkpoint`). `models.load("ntm-copy")` loads a bundled model by name.

The names below are imported when first used, so that importing a torch-free module of the
package (`models.locate`) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.base import MemoryModel as MemoryModel
    from models.checkpoint import load as load
    from models.checkpoint import save as save
    from models.locate import CheckpointError as CheckpointError
    from models.locate import bundled_names as bundled_names
    from models.state import StatePool as StatePool
    from models.state import StateSpec as StateSpec

_WHERE = {
    "CheckpointError": "models.locate",
    "MemoryModel": "models.base",
    "StatePool": "models.state",
    "StateSpec": "models.state",
    "bundled_names": "models.locate",
    "load": "models.checkpoint",
    "save": "models.checkpoint",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)

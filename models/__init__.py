"""NTM, DNC and VMED cells: a training forward over whole sequences and a serving step over
a state pool (`models.base`), their per-session state (`models.state`) and checkpoints
(`models.checkpoint`). `models.load("ntm-copy")` loads a bundled model by name."""

from models.base import MemoryModel
from models.checkpoint import CheckpointError, bundled_names, load, save
from models.state import StatePool, StateSpec

__all__ = [
    "CheckpointError",
    "MemoryModel",
    "StatePool",
    "StateSpec",
    "bundled_names",
    "load",
    "save",
]

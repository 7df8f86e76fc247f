"""The training loop every task shares: Adam, gradient clipping, progress, checkpoints, resume.

A run writes into one output directory: the checkpoint (`config.json`, `model.safetensors`)
every `checkpoint_every` steps and at the end, plus `training-state.safetensors` (optimizer
moments) and `training.json` (step, run settings, loss history) that `resume` continues from.
Batch t is drawn from a generator seeded by (seed, t), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.base import MemoryModel
from models.checkpoint import load, save

STATE_FILE = "training-state.safetensors"
RUN_FILE = "training.json"


class Task(Protocol):
    """What the loop needs from a task: batches and a loss with metrics."""

    @property
    def name(self) -> str:
        """What provenance calls the task ("copy", ...)."""
        ...

    def loss(
        self, model: MemoryModel, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, dict[str, float]]:
        """Draw one batch from `generator`, run the model, return the loss and metrics."""
        ...


@dataclass(frozen=True)
class TrainSettings:
    """How to train; stored in `training.json` so a resumed run keeps them."""

    steps: int
    batch_size: int
    learning_rate: float
    clip_norm: float
    seed: int
    checkpoint_every: int
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not self.learning_rate > 0 or not self.clip_norm > 0:
            raise ValueError("learning rate and clip norm must be > 0")


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator batch `step` of a run with `seed` is drawn from."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Optimizer tensors to safetensors; returns the JSON-able rest (hyperparameters)."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path, rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, tensor in load_file(path).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


class Progress:
    """A one-line progress display on a terminal, periodic plain lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, metrics: dict[str, float], final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.began
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = (
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  {shown}  "
            f"{rate:.1f} steps/s  eta {eta / 60:.0f} min"
        )
        if self.tty:
            print("\r" + line.ljust(110), end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def train(
    model: MemoryModel,
    task: Task,
    settings: TrainSettings,
    out: str | os.PathLike[str],
    command: str,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `model` on `task` into checkpoint directory `out`; returns the final log entry.

    Without `resume`, refuses a directory that already holds a run. With it, continues the
    run recorded there (its model, optimizer state, settings and history) up to
    `settings.steps`.
    """
    out = Path(out)
    device = torch.device(device)
    run_path = out / RUN_FILE
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    history: list[dict[str, Any]] = []
    start = 0
    if run_path.exists() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it")
    if resume:
        if not run_path.exists():
            raise ValueError(f"{out} holds no training run to resume ({RUN_FILE} is missing)")
        run = json.loads(run_path.read_text())
        saved = load(out, device)
        model.load_state_dict(saved.state_dict())
        model.train()
        _load_optimizer(optimizer, out / STATE_FILE, run["optimizer"])
        start, history = int(run["step"]), list(run["history"])
        if start >= settings.steps:
            raise ValueError(f"the run in {out} already reached step {start} of {settings.steps}")

    def checkpoint(step: int, entry: dict[str, Any]) -> None:
        provenance = {
            "task": task.name,
            "task_settings": asdict(task) if is_dataclass(task) else {},
            "steps": step,
            "seed": settings.seed,
            "final_loss": entry.get("loss"),
            "command": command,
            "settings": asdict(settings),
            "trained_seconds": entry.get("elapsed_seconds"),
            "memserve": version("memserve"),
            "torch": torch.__version__,
        }
        save(model, out, provenance)
        rest = _save_optimizer(optimizer, out / STATE_FILE)
        run = {"step": step, "settings": asdict(settings), "optimizer": rest, "history": history}
        tmp = run_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run) + "\n")
        os.replace(tmp, run_path)

    bar = Progress(settings.steps, start, progress)
    elapsed_before = float(history[-1]["elapsed_seconds"]) if history else 0.0
    began = time.monotonic()
    totals: dict[str, float] = {}
    count = 0
    entry: dict[str, Any] = history[-1] if history else {}
    for step in range(start + 1, settings.steps + 1):
        loss, metrics = task.loss(model, batch_generator(settings.seed, step), device)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss became {value} at step {step}; lower the learning rate"
            )
        for key, metric in {"loss": value, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + metric
        count += 1
        last = step == settings.steps
        if step % settings.log_every == 0 or last:
            entry = {"step": step, **{k: v / count for k, v in totals.items()}}
            entry["elapsed_seconds"] = round(elapsed_before + time.monotonic() - began, 1)
            history.append(entry)
            totals, count = {}, 0
            bar.update(
                step, {k: v for k, v in entry.items() if k not in ("step", "elapsed_seconds")}, last
            )
            if on_log is not None:
                on_log(entry)
        if step % settings.checkpoint_every == 0 or last:
            checkpoint(step, entry)
    model.eval()
    return entry

"""The training loop every task shares: Adam with a cosine learning-rate decay, gradient
clipping, progress, checkpoints, resume.

The decay matters for NTMs: at a constant 1e-3, a copy-task NTM that had converged (loss
5e-4) fell back to chance at step 2,600 of one run; letting the rate fall to a hundredth by
the end of the run settles the weights instead.

A run writes into one output directory, every `checkpoint_every` steps and at the end:
`training-state.safetensors`, everything `resume` needs (weights, optimizer moments, the
step, the settings, the loss history) in one file replaced atomically, so a run killed at
any moment resumes from its last complete checkpoint; then the checkpoint proper
(`config.json`, `model.safetensors`) and `training.json` (the loss history, for people).
Batch t is drawn from a generator seeded by (seed, t), so a resumed run sees exactly the
batches the uninterrupted run would have seen and ends bit-identical to it.

At every checkpoint the model is scored on the task's fixed validation set; the exported
checkpoint is the best-scoring one so far (scores compared in order, lexicographically), so
a late collapse, which NTMs are prone to, cannot replace a good model with a broken one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.base import MemoryModel
from models.checkpoint import CONFIG_FILE, save

STATE_FILE = "training-state.safetensors"
RUN_FILE = "training.json"


class _TaskBase(Protocol):
    @property
    def name(self) -> str:
        """What provenance calls the task ("copy", ...)."""
        ...

    def validate(self, model: MemoryModel, device: torch.device) -> dict[str, float]:
        """Scores on a fixed held-out set, most important first, each lower-is-better."""
        ...


class Task(_TaskBase, Protocol):
    """What the loop needs from a task: batches and a loss with metrics."""

    def loss(
        self, model: MemoryModel, generator: torch.Generator, device: torch.device, step: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """Draw one batch from `generator`, run the model, return the loss and metrics.

        `step` is the optimizer step being taken (from 1), for schedules such as the KL
        annealing of the dialogue task; a resumed run passes the same steps again."""
        ...


@runtime_checkable
class GradientTask(_TaskBase, Protocol):
    """A task that takes its loss's gradient itself, e.g. by truncated backpropagation
    through time, which calls backward once per stretch of a long sequence."""

    def accumulate_gradients(
        self, model: MemoryModel, generator: torch.Generator, device: torch.device, step: int
    ) -> tuple[float, dict[str, float]]:
        """Draw one batch from `generator`, add the gradient of its loss to the parameters'
        `.grad` (which the loop has cleared), return the loss's value and metrics; `step` as
        for `Task.loss`."""
        ...


@dataclass(frozen=True)
class TrainSettings:
    """How to train; stored in `training.json` so a resumed run keeps them."""

    steps: int
    batch_size: int
    learning_rate: float  # at step 1; decays along a cosine to final_learning_rate
    final_learning_rate: float
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
        if not 0 <= self.final_learning_rate <= self.learning_rate:
            raise ValueError("the final learning rate must be in 0..learning rate")

    def learning_rate_at(self, step: int) -> float:
        """Cosine decay from `learning_rate` at step 1 to `final_learning_rate` at the end."""
        progress = (step - 1) / max(1, self.steps - 1)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.final_learning_rate + (self.learning_rate - self.final_learning_rate) * cosine


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator batch `step` of a run with `seed` is drawn from."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _save_state(
    path: Path, model: MemoryModel, optimizer: torch.optim.Optimizer, run: dict[str, Any]
) -> None:
    """Weights, optimizer moments and the run record in one atomically replaced file."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    run = {**run, "param_groups": optimizer_state["param_groups"]}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"run": json.dumps(run)})
    os.replace(tmp, path)


def _load_state(
    path: Path,
) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]], dict[str, Any]]:
    """The weights, the optimizer state by parameter index, and the run record."""
    weights: dict[str, Tensor] = {}
    moments: dict[int, dict[str, Tensor]] = {}
    try:
        with safe_open(path, framework="pt") as handle:
            run: dict[str, Any] = json.loads(handle.metadata()["run"])
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable training state: {error}") from error
    for name, tensor in tensors.items():
        kind, rest = name.split(".", 1)
        if kind == "model":
            weights[rest] = tensor
        else:
            index, key = rest.split(".", 1)
            moments.setdefault(int(index), {})[key] = tensor
    return weights, moments, run


class Progress:
    """A one-line progress display on a terminal, periodic plain lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.monotonic()
        self.tty = sys.stderr.isatty()

    def note(self, message: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + message, file=sys.stderr, flush=True)

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


def _task_settings(task: Task | GradientTask) -> dict[str, Any]:
    """A task's settings for provenance (its dataclass fields)."""
    return asdict(task) if is_dataclass(task) and not isinstance(task, type) else {}


def _defaults(settings: object) -> dict[str, Any]:
    """The default of each field of a dataclass instance that has one ({} for others)."""
    if not is_dataclass(settings) or isinstance(settings, type):
        return {}
    return {f.name: f.default for f in fields(settings) if f.default is not MISSING}


def _check_same_run(
    run: dict[str, Any], model: MemoryModel, task: Task | GradientTask, settings: TrainSettings
) -> None:
    """Raise ValueError naming every setting in which a resume differs from its run."""
    ignored = ("checkpoint_every", "log_every")  # these may change without changing the run
    recorded = {
        "model type": run["model_type"],
        **{f"model {k}": v for k, v in run["hyperparameters"].items()},
        **{f"task {k}": v for k, v in run["task_settings"].items()},
        **{k: v for k, v in run["settings"].items() if k not in ignored},
    }
    given = {
        "model type": model.model_type,
        **{f"model {k}": v for k, v in model.hyperparameters().items()},
        **{f"task {k}": v for k, v in _task_settings(task).items()},
        **asdict(settings),
    }
    differences = [
        f"{key.replace('_', '-')} {given.get(key)} (the run has {value})"
        for key, value in recorded.items()
        if given.get(key) != value
    ]
    # A setting added since the run began: the run had its default.
    defaults = {
        **{f"model {k}": v for k, v in _defaults(model.config).items()},
        **{f"task {k}": v for k, v in _defaults(task).items()},
        **_defaults(settings),
    }
    differences += [
        f"{key.replace('_', '-')} {value} (the run predates it: it ran with {defaults[key]})"
        for key, value in given.items()
        if key not in recorded and key not in ignored and key in defaults and value != defaults[key]
    ]
    if differences:
        raise ValueError(
            "a resumed run must keep the settings it was started with; this one differs in "
            + ", ".join(differences)
        )


def train(
    model: MemoryModel,
    task: Task | GradientTask,
    settings: TrainSettings,
    out: str | os.PathLike[str],
    command: str,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` on `task` into checkpoint directory `out`; returns the final log entry.

    Without `resume`, refuses a directory that already holds a run. With it, continues the
    run recorded there (its weights, optimizer state and history) exactly as the
    uninterrupted run would have gone on, so the model, the task and the settings must be
    the ones it was started with; a difference is an error that names it.
    """
    out = Path(out)
    device = torch.device(device)
    state_path = out / STATE_FILE
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    history: list[dict[str, Any]] = []
    validations: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # the validation record of the exported checkpoint
    start = 0
    if state_path.exists() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it")
    if (out / CONFIG_FILE).exists() and not state_path.exists():
        raise ValueError(f"{out} already holds a checkpoint; train into another directory")
    if resume:
        if not state_path.exists():
            raise ValueError(f"{out} holds no training run to resume ({STATE_FILE} is missing)")
        weights, moments, run = _load_state(state_path)
        _check_same_run(run, model, task, settings)
        model.load_state_dict(weights)
        optimizer.load_state_dict({"state": moments, "param_groups": run["param_groups"]})
        start, history = int(run["step"]), list(run["history"])
        validations, best = list(run["validations"]), run["best"]
        if start >= settings.steps:
            raise ValueError(
                f"the run in {out} already finished (step {start} of {settings.steps})"
            )

    def checkpoint(step: int, entry: dict[str, Any]) -> None:
        nonlocal best
        model.eval()
        with torch.no_grad():
            scores = task.validate(model, device)
        model.train()
        record = {"step": step, **scores}
        validations.append(record)
        improved = best is None or tuple(scores.values()) <= tuple(best[key] for key in scores)
        if improved:
            best = record
        run = {
            "step": step,
            "model_type": model.model_type,
            "hyperparameters": model.hyperparameters(),
            "task_settings": _task_settings(task),
            "settings": asdict(settings),
            "history": history,
            "validations": validations,
            "best": best,
        }
        # The exported checkpoint first, the training state last: the state file is the
        # commit point, so a run killed in between redoes this step and exports it again.
        if improved:
            provenance = {
                "task": task.name,
                "task_settings": _task_settings(task),
                "steps": step,
                "seed": settings.seed,
                "final_loss": entry.get("loss"),
                "validation": scores,
                "command": command,
                "settings": asdict(settings),
                "trained_seconds": entry.get("elapsed_seconds"),
                "memserve": version("memserve"),
                "torch": torch.__version__,
            }
            save(model, out, provenance)
        _save_state(state_path, model, optimizer, run)
        log_path = out / RUN_FILE
        log_path.with_suffix(".tmp").write_text(json.dumps(run, indent=1) + "\n")
        os.replace(log_path.with_suffix(".tmp"), log_path)
        # Said once the state is committed, so a reader may take it as the event that a
        # run killed from now on resumes from this step (or a later one).
        bar.note(
            f"checkpoint at step {step} saved; validation: "
            + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            + (
                " (best so far, exported)"
                if improved
                else f" (best: step {(best or record)['step']})"
            )
        )

    out.mkdir(parents=True, exist_ok=True)
    bar = Progress(settings.steps, start, progress)
    elapsed_before = float(history[-1]["elapsed_seconds"]) if history else 0.0
    began = time.monotonic()
    totals: dict[str, float] = {}
    count = 0
    entry: dict[str, Any] = history[-1] if history else {}
    for step in range(start + 1, settings.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate_at(step)
        optimizer.zero_grad(set_to_none=True)
        generator = batch_generator(settings.seed, step)
        if isinstance(task, GradientTask):
            value, metrics = task.accumulate_gradients(model, generator, device, step)
        else:
            loss, metrics = task.loss(model, generator, device, step)
            value = float(loss.detach())
            torch.autograd.backward(loss)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        if not (math.isfinite(value) and bool(torch.isfinite(norm))):
            # Before the update, so the weights and the last checkpoint stay good.
            raise FloatingPointError(
                f"the loss or its gradient became non-finite at step {step} (loss {value}); "
                "start a new run with a lower --lr or --clip (a resumed run keeps its settings)"
            )
        optimizer.step()
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
        if step % settings.checkpoint_every == 0 or last:
            checkpoint(step, entry)
    model.eval()
    return entry

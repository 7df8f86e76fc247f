"""`memserve eval TASK`: score a checkpoint on fresh sequences; a table, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_LENGTHS = "10,20,30,40,60,80,120"


def parse_lengths(text: str) -> list[int]:
    """'10,20,30' -> [10, 20, 30]; every length >= 1."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths needs at least one length, each >= 1, got {text!r}")
    return lengths


def add_copy_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve eval copy` and its options."""
    parser = commands.add_parser(
        "copy",
        help="bit errors per sequence of a copy-task model, by sequence length",
        description=(
            "Evaluate a copy-task checkpoint on fresh random sequences of each length: mean "
            "bit errors per sequence (outputs thresholded at 0.5, recall phase only). Prints "
            "a table, writes it as JSON and plots error against length with the training "
            "range shaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="ntm-copy", help="bundled model name or checkpoint dir")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated lengths")
    parser.add_argument("--samples", type=int, default=1000, help="sequences per length")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the test sequences")
    parser.add_argument("--json", default="copy-eval.json", help="JSON file to write")
    parser.add_argument("--plot", default="copy-eval.png", help="PNG file to write ('' skips)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.set_defaults(handler=run_copy)


def plot_copy(
    results: list[dict[str, Any]], training_range: tuple[int, int] | None, title: str, path: Path
) -> None:
    """Mean bit errors per sequence against length, with the training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in results]
    means = [r["mean_bit_errors"] for r in results]
    errors = [r["standard_error"] for r in results]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if training_range is not None:
        axes.axvspan(*training_range, color="tab:green", alpha=0.15, label="training lengths")
    axes.errorbar(lengths, means, yerr=errors, marker="o", capsize=3, label="mean bit errors")
    axes.set_xlabel("sequence length")
    axes.set_ylabel("bit errors per sequence")
    # symlog keeps zero errors on the plot; the limits make every decade up to the worst show.
    axes.set_yscale("symlog", linthresh=0.01)
    axes.set_ylim(0, max(1.0, 2 * max(means)))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_copy(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON and the plot."""
    import torch

    from memserve import __version__
    from models.checkpoint import load, resolve
    from models.tasks.copy import evaluate_copy

    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    torch.set_num_threads(args.threads)
    model = load(args.model)
    bits = model.output_size
    if model.input_size != bits + 1:
        raise ValueError(
            f"{args.model} is not a copy-task model: it takes {model.input_size} inputs and "
            f"gives {model.output_size} outputs (copy needs bits + 1 and bits)"
        )
    generator = torch.Generator().manual_seed(args.seed)
    began = time.monotonic()
    results = []
    print(f"{'length':>6}  {'bit errors/seq':>14}  {'± s.e.':>8}  {'worst':>5}  {'perfect':>7}")
    for length in lengths:
        result = evaluate_copy(model, length, args.samples, generator, bits)
        results.append(result)
        print(
            f"{length:>6}  {result['mean_bit_errors']:>14.4f}  {result['standard_error']:>8.4f}  "
            f"{result['max_bit_errors']:>5.0f}  {100 * result['perfect_fraction']:>6.1f}%",
            flush=True,
        )
    provenance = getattr(model, "provenance", {})
    settings = provenance.get("settings") or {}
    command = provenance.get("command", "")
    task_settings = provenance.get("task_settings") or {}
    training_range = (
        (int(task_settings["min_length"]), int(task_settings["max_length"]))
        if "min_length" in task_settings and "max_length" in task_settings
        else None
    )
    report = {
        "task": "copy",
        "model": args.model,
        "checkpoint": str(resolve(args.model)),
        "samples_per_length": args.samples,
        "seed": args.seed,
        "results": results,
        "training": {"steps": provenance.get("steps"), "settings": settings, "command": command},
        "training_lengths": list(training_range) if training_range else None,
        "command": shlex.join(["memserve", *sys.argv[1:]]),
        "memserve": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(time.monotonic() - began, 1),
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.plot:
        plot_copy(results, training_range, f"copy task: {args.model}", Path(args.plot))
        print(f"wrote {args.plot}")
    return 0

"""`memserve eval TASK`: score a checkpoint on fresh sequences; a table, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from models.base import MemoryModel

DEFAULT_LENGTHS = "10,20,30,40,60,80,120"
DEFAULT_ITEMS = "2,4,6,8,10,12,16"


class SizeAxis(NamedTuple):
    """What a task's evaluation varies: its option (`--lengths`), what one value is called,
    its key in each result, the plot's x label, the report's keys for samples per size and
    for the training range, and the label of the shaded training band."""

    option: str
    noun: str
    key: str
    label: str
    samples_key: str
    range_key: str
    range_label: str


COPY_AXIS = SizeAxis(
    option="--lengths",
    noun="length",
    key="length",
    label="sequence length",
    samples_key="samples_per_length",
    range_key="training_lengths",
    range_label="training lengths",
)
RECALL_AXIS = SizeAxis(
    option="--items",
    noun="item count",
    key="items",
    label="items in the sequence",
    samples_key="samples_per_count",
    range_key="training_items",
    range_label="training items",
)


def parse_sizes(text: str, axis: SizeAxis = COPY_AXIS) -> list[int]:
    """'10,20,30' -> [10, 20, 30]; every size >= 1. Errors name the axis's option."""
    option, noun = axis.option, axis.noun
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{option} needs at least one {noun}, each >= 1, got {text!r}")
    return sizes


def _add_arguments(
    parser: argparse.ArgumentParser, task: str, model: str, axis: SizeAxis, default_sizes: str
) -> None:
    """The options every evaluation shares: the model, the sizes, the samples, the outputs."""
    parser.add_argument("--model", default=model, help="bundled model name or checkpoint dir")
    parser.add_argument(axis.option, default=default_sizes, help=f"comma-separated {axis.noun}s")
    parser.add_argument("--samples", type=int, default=1000, help=f"sequences per {axis.noun}")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the test sequences")
    parser.add_argument("--json", default=f"{task}-eval.json", help="JSON file to write")
    parser.add_argument("--plot", default=f"{task}-eval.png", help="PNG file to write ('' skips)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")


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
    _add_arguments(parser, "copy", "ntm-copy", COPY_AXIS, DEFAULT_LENGTHS)
    parser.set_defaults(handler=run_copy)


def add_recall_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve eval recall` and its options."""
    parser = commands.add_parser(
        "recall",
        help="bit errors per sequence of an associative-recall model, by item count",
        description=(
            "Evaluate an associative-recall checkpoint on fresh random sequences of each item "
            "count: mean bit errors per sequence (outputs thresholded at 0.5, answer only). "
            "Prints a table, writes it as JSON and plots error against item count with the "
            "training range shaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(parser, "recall", "dnc-recall", RECALL_AXIS, DEFAULT_ITEMS)
    parser.add_argument(
        "--item-size", type=int, default=0,
        help="vectors per item (0: the item size the model was trained with, else 3)",
    )  # fmt: skip
    parser.set_defaults(handler=run_recall)


def plot_bit_errors(
    results: list[dict[str, Any]],
    axis: SizeAxis,
    training_range: tuple[int, int] | None,
    title: str,
    path: Path,
) -> None:
    """Mean bit errors per sequence against the size of each result, training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r[axis.key] for r in results]
    means = [r["mean_bit_errors"] for r in results]
    errors = [r["standard_error"] for r in results]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if training_range is not None:
        axes.axvspan(*training_range, color="tab:green", alpha=0.15, label=axis.range_label)
    axes.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, label="mean bit errors")
    axes.set_xlabel(axis.label)
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


def size_generator(seed: int, size: int) -> torch.Generator:
    """The generator of the test sequences of one size: seeded by (seed, size), so a size's
    result does not depend on which other sizes are evaluated with it."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + size)


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work, what would fail only after the evaluation has run."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{option} {path}: the directory {Path(path).parent} does not exist")


def _training_range(model: MemoryModel, low: str, high: str) -> tuple[int, int] | None:
    """The (low, high) task settings the model was trained with, if its provenance has them."""
    task_settings = model.provenance.get("task_settings") or {}
    if low in task_settings and high in task_settings:
        return int(task_settings[low]), int(task_settings[high])
    return None


def _evaluate_sizes(
    sizes: list[int], axis: SizeAxis, evaluate: Callable[[int], dict[str, float]]
) -> list[dict[str, float]]:
    """Evaluate each size, printing one table row as each finishes."""
    results = []
    print(f"{axis.key:>6}  {'bit errors/seq':>14}  {'± s.e.':>8}  {'worst':>5}  {'perfect':>7}")
    for size in sizes:
        result = evaluate(size)
        results.append(result)
        print(
            f"{size:>6}  {result['mean_bit_errors']:>14.4f}  {result['standard_error']:>8.4f}  "
            f"{result['max_bit_errors']:>5.0f}  {100 * result['perfect_fraction']:>6.1f}%",
            flush=True,
        )
    return results


def run_provenance(
    args: argparse.Namespace, model: MemoryModel, began: float, **training: Any
) -> dict[str, Any]:
    """What every evaluation report ends with: how the model was trained (its provenance,
    with `training` added), the command, the versions and the vector unit it ran on (which
    rounds some sums), and how long it took."""
    import torch

    from memserve import __version__

    provenance = model.provenance
    return {
        "training": {
            "steps": provenance.get("steps"),
            "settings": provenance.get("settings") or {},
            **training,
            "command": provenance.get("command", ""),
        },
        "command": shlex.join(["memserve", *args.argv]),
        "memserve": __version__,
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "seconds": round(time.monotonic() - began, 1),
    }


def _write_report(
    args: argparse.Namespace,
    model: MemoryModel,
    task: str,
    axis: SizeAxis,
    results: list[dict[str, float]],
    training_range: tuple[int, int] | None,
    began: float,
    extra: dict[str, Any],
) -> None:
    """Write the JSON report (results, training provenance, versions) and the plot."""
    from models.checkpoint import resolve

    report = {
        "task": task,
        "model": args.model,
        "checkpoint": str(resolve(args.model)),
        axis.samples_key: args.samples,
        "seed": args.seed,
        **extra,
        "results": results,
        axis.range_key: list(training_range) if training_range else None,
        **run_provenance(args, model, began),
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.plot:
        title = f"{task} task: {args.model}"
        plot_bit_errors(results, axis, training_range, title, Path(args.plot))
        print(f"wrote {args.plot}")


def run_copy(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON and the plot."""
    import torch

    from models.checkpoint import load
    from models.tasks.copy import evaluate_copy

    lengths = parse_sizes(args.lengths, COPY_AXIS)
    check_evaluation_arguments(args)
    torch.set_num_threads(args.threads)
    model = load(args.model)
    bits = model.output_size
    if model.input_size != bits + 1:
        raise ValueError(
            f"{args.model} is not a copy-task model: it takes {model.input_size} inputs and "
            f"gives {model.output_size} outputs (copy needs bits + 1 and bits)"
        )
    began = time.monotonic()
    results = _evaluate_sizes(
        lengths,
        COPY_AXIS,
        lambda length: evaluate_copy(
            model, length, args.samples, size_generator(args.seed, length), bits
        ),
    )
    training_range = _training_range(model, "min_length", "max_length")
    _write_report(args, model, "copy", COPY_AXIS, results, training_range, began, {})
    return 0


def run_recall(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON and the plot."""
    import torch

    from models.checkpoint import load
    from models.tasks.recall import check_recall_arguments, evaluate_recall

    counts = parse_sizes(args.items, RECALL_AXIS)
    check_evaluation_arguments(args)
    torch.set_num_threads(args.threads)
    model = load(args.model)
    bits = model.output_size
    if model.input_size != bits + 2:
        raise ValueError(
            f"{args.model} is not an associative-recall model: it takes {model.input_size} "
            f"inputs and gives {model.output_size} outputs (recall needs bits + 2 and bits)"
        )
    trained_item_size = (model.provenance.get("task_settings") or {}).get("item_size", 3)
    item_size = int(args.item_size or trained_item_size)
    try:
        check_recall_arguments(min(counts), max(counts), bits, item_size)
    except ValueError as error:
        raise ValueError(f"{error} (--items {args.items}, --item-size {item_size})") from None
    began = time.monotonic()
    results = _evaluate_sizes(
        counts,
        RECALL_AXIS,
        lambda count: evaluate_recall(
            model, count, args.samples, size_generator(args.seed, count), bits, item_size
        ),
    )
    training_range = _training_range(model, "min_items", "max_items")
    extra = {"bits": bits, "item_size": item_size}
    _write_report(args, model, "recall", RECALL_AXIS, results, training_range, began, extra)
    return 0


def add_dialogue_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve eval dialogue` and its options."""
    parser = commands.add_parser(
        "dialogue",
        help="perplexity by turn, BLEU and distinct-n of a VMED on its held-out dialogues",
        description=(
            "Evaluate a VMED checkpoint on the held-out dialogues of the Persona-Chat corpus it "
            "was trained on (the split its provenance records), as they are served: each whole "
            "conversation is written into memory turn by turn (every utterance, then <eos>, "
            "both speakers), and every utterance is scored as a reply from the memory of the "
            "conversation before it. Reports the perplexity with z from the prior, overall "
            "and by turn (1, 2, ..., 6, 7 and later), the perplexity bound (posterior "
            "cross-entropy + KL) and the KL per token; and on greedy replies generated "
            "through the serving path at every turn (z from the prior, noise seeded by "
            "--seed) corpus BLEU-1, BLEU-4, distinct-1 and distinct-2, and the fraction of "
            "replies that change when z's noise comes from --seed + 1. With "
            "--presence-penalty the greedy replies are chosen as a Generate call with that "
            "presence_penalty chooses them. Prints a table and writes JSON."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or name of a VMED")
    parser.add_argument("--corpus", required=True, help="the Persona-Chat text file")
    parser.add_argument(
        "--conversations", type=int, default=0, help="held-out conversations to score (0: all)"
    )
    parser.add_argument("--seed", type=int, default=12345, help="seeds the prior's noise")
    parser.add_argument("--max-reply-tokens", type=int, default=32, help="generation limit")
    parser.add_argument(
        "--presence-penalty", type=float, default=0.0,
        help="taken off the logit of every token the model has said earlier in the "
        "conversation, when greedy replies are generated (0: plain greedy)",
    )  # fmt: skip
    parser.add_argument("--json", default="dialogue-eval.json", help="JSON file to write")
    parser.add_argument("--examples", type=int, default=1, help="conversations to print")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.set_defaults(handler=run_dialogue)


def run_dialogue(args: argparse.Namespace) -> int:
    """Evaluate a VMED on its held-out dialogues; print the table, write the JSON."""
    import torch

    from models.checkpoint import load, resolve
    from models.tasks.dialogue import (
        TURN_BUCKETS,
        evaluate_dialogue,
        make_conversations,
        read_corpus,
        split_dialogues,
        turn_bucket_label,
    )
    from models.vmed import VMED

    if args.conversations < 0 or args.threads < 1 or args.max_reply_tokens < 1:
        raise ValueError("--conversations must be >= 0, --threads and --max-reply-tokens >= 1")
    if not (math.isfinite(args.presence_penalty) and args.presence_penalty >= 0):
        raise ValueError(f"--presence-penalty must be >= 0, got {args.presence_penalty}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(
            f"--json {args.json}: the directory {Path(args.json).parent} does not exist"
        )
    torch.set_num_threads(args.threads)
    model = load(args.model)
    if not isinstance(model, VMED) or model.tokenizer is None:
        raise ValueError(f"{args.model} is not a VMED dialogue model ({model.model_type})")
    task_settings = model.provenance.get("task_settings") or {}
    split = (
        float(task_settings.get("validation_fraction", 0.1)),
        int(task_settings.get("split_seed", 0)),
    )
    began = time.monotonic()
    _, held_out = split_dialogues(read_corpus(args.corpus), *split)
    if args.conversations:
        held_out = held_out[: args.conversations]
    conversations = make_conversations(held_out, model.tokenizer)
    metrics, replies = evaluate_dialogue(
        model,
        conversations,
        args.seed,
        args.max_reply_tokens,
        presence_penalty=args.presence_penalty,
    )
    print(
        f"{metrics['replies']:.0f} replies ({metrics['tokens']:.0f} tokens) of "
        f"{len(conversations)} held-out conversations, each whole in memory"
    )
    by_turn = [turn_bucket_label(bucket) for bucket in range(TURN_BUCKETS)]
    print(f"{'turn':<38} " + " ".join(f"{label:>7}" for label in by_turn))
    for key, label in (
        ("perplexity_turn_", "perplexity (z from the prior)"),
        ("replies_turn_", "replies"),
    ):
        values = " ".join(f"{metrics[key + b]:>7.1f}" for b in by_turn)
        print(f"{label:<38} {values}")
    names = {
        "perplexity": "perplexity, overall (z from the prior)",
        "perplexity_bound": "perplexity bound (posterior CE + KL)",
        "kl_per_token": "KL per token (nats)",
        "kl_per_reply": "KL per reply (nats)",
        "bleu_1": "BLEU-1 (%)",
        "bleu_4": "BLEU-4 (%)",
        "distinct_1": "distinct-1",
        "distinct_2": "distinct-2",
        "mean_reply_words": "words per reply",
        "replies_changed_by_z": "replies changed by another z",
    }
    for key, label in names.items():
        value = metrics[key] * (100 if key.startswith("bleu") else 1)
        print(f"{label:<38} {value:>10.4f}")
    for conversation, generated in list(zip(conversations, replies, strict=True))[: args.examples]:
        for turn, (said, reply) in enumerate(zip(conversation.texts, generated, strict=True)):
            print(f"turn {turn + 1:>2} said:  {said}\n        model: {reply}")
    samples = [
        {"turn": turn + 1, "reference": said, "reply": reply}
        for conversation, generated in list(zip(conversations, replies, strict=True))[:3]
        for turn, (said, reply) in enumerate(zip(conversation.texts, generated, strict=True))
    ]
    report = {
        "task": "dialogue",
        "model": args.model,
        "checkpoint": str(resolve(args.model)),
        "corpus": args.corpus,
        "split": {"validation_fraction": split[0], "split_seed": split[1]},
        "setting": (
            "whole conversations written into memory turn by turn (utterance, then <eos>, both "
            "speakers, uncut); every utterance scored as a reply"
        ),
        "seed": args.seed,
        "max_reply_tokens": args.max_reply_tokens,
        "decoding": "greedy, z from the prior (noise seeded by --seed)"
        + (
            f", presence penalty {args.presence_penalty:g} on the tokens the model said "
            "earlier in the conversation"
            if args.presence_penalty
            else ""
        ),
        "presence_penalty": args.presence_penalty,
        "bleu": "corpus BLEU, fraction in [0, 1], whitespace words, no smoothing (our own code)",
        "metrics": metrics,
        "samples": samples,
        "hyperparameters": model.hyperparameters(),
        **run_provenance(args, model, began, task_settings=task_settings),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

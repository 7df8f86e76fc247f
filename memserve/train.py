"""`memserve train TASK`: train a model on a task into a checkpoint directory."""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.training import TrainSettings


def _add_run_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """Where the run goes and how it optimises: the options every task shares, first."""
    parser.add_argument(
        "--out", required=True, default=argparse.SUPPRESS, help="checkpoint directory to write"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate at the start")
    parser.add_argument(
        "--final-lr", type=float, default=1e-5,
        help="learning rate at the last step (cosine decay from --lr)",
    )  # fmt: skip
    parser.add_argument("--clip", type=float, default=10.0, help="gradient norm clip")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and every batch")


def _add_output_arguments(parser: argparse.ArgumentParser, threads_help: str) -> None:
    """Checkpoints, progress and threads: the options every task shares, last."""
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps per checkpoint")
    parser.add_argument("--log-every", type=int, default=100, help="steps per progress entry")
    parser.add_argument("--threads", type=int, default=1, help=threads_help)
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _settings(args: argparse.Namespace) -> TrainSettings:
    """The run's settings; also checks the options that are not settings."""
    from models.training import TrainSettings

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")

    return TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        final_learning_rate=args.final_lr,
        clip_norm=args.clip,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )


def _command(args: argparse.Namespace) -> str:
    """The command line this run was started with, for its provenance."""
    return shlex.join(["memserve", *args.argv])


def _print_final(final: dict[str, Any], out: str) -> None:
    print(
        f"trained to step {final.get('step')}: loss {final.get('loss', float('nan')):.4g}, "
        f"bit errors per sequence {final.get('bit_errors', float('nan')):.3g}; "
        f"checkpoint in {out}"
    )


def add_copy_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve train copy` and its options."""
    parser = commands.add_parser(
        "copy",
        help="train an NTM on the copy task (Graves et al. 2014)",
        description=(
            "Train an NTM to copy sequences of random bit vectors: the sequence, a delimiter, "
            "then the sequence again from memory. Lengths are uniform in the given range (one "
            "length per batch). Writes a checkpoint (config.json, model.safetensors) into OUT "
            "every --checkpoint-every steps; --resume continues an interrupted run exactly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_arguments(parser, steps=12000)
    parser.add_argument("--min-length", type=int, default=1, help="shortest training sequence")
    parser.add_argument("--max-length", type=int, default=20, help="longest training sequence")
    parser.add_argument("--bits", type=int, default=8, help="bits per vector")
    parser.add_argument("--memory-rows", type=int, default=128, help="memory rows N")
    parser.add_argument("--memory-width", type=int, default=20, help="memory row width M")
    parser.add_argument("--controller-size", type=int, default=100, help="LSTM hidden size")
    parser.add_argument("--controller-layers", type=int, default=1, help="LSTM layers")
    parser.add_argument("--read-heads", type=int, default=1, help="read heads R")
    parser.add_argument("--write-heads", type=int, default=1, help="write heads W")
    parser.add_argument("--shift-radius", type=int, default=1, help="shifts by -K..K")
    _add_output_arguments(parser, "CPU threads for torch (small NTM steps run fastest on one)")
    parser.set_defaults(handler=run_copy)


def run_copy(args: argparse.Namespace) -> int:
    """Train the copy task as `args` say; the checkpoint records this exact command."""
    import torch

    from models.ntm import NTM, NTMConfig
    from models.tasks.copy import CopyTask
    from models.training import train

    if args.bits < 1:
        raise ValueError(f"--bits must be >= 1, got {args.bits}")
    if not 1 <= args.min_length <= args.max_length:
        raise ValueError(
            f"need 1 <= --min-length <= --max-length, got {args.min_length}, {args.max_length}"
        )
    settings = _settings(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = NTMConfig(
        input_size=args.bits + 1,
        output_size=args.bits,
        memory_rows=args.memory_rows,
        memory_width=args.memory_width,
        read_heads=args.read_heads,
        write_heads=args.write_heads,
        shift_radius=args.shift_radius,
        controller_size=args.controller_size,
        controller_layers=args.controller_layers,
    )
    task = CopyTask(args.batch_size, args.min_length, args.max_length, args.bits)
    final = train(
        NTM(config), task, settings, args.out, _command(args), resume=args.resume,
        progress=not args.quiet,
    )  # fmt: skip
    _print_final(final, args.out)
    return 0


def add_recall_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve train recall` and its options."""
    parser = commands.add_parser(
        "recall",
        help="train a DNC on associative recall (Graves et al. 2014)",
        description=(
            "Train a DNC on associative recall: items of --item-size random bit vectors, each "
            "after a delimiter, then a query item between two query delimiters; the model must "
            "output the item that followed the queried one. It has to find the item by content "
            "and step forward in write order, which the DNC's allocation and temporal links do "
            "(--no-links trains one without them, for comparison). Item counts are uniform in "
            "the given range (one count per batch). Writes a checkpoint (config.json, "
            "model.safetensors) into OUT every --checkpoint-every steps; --resume continues an "
            "interrupted run exactly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_arguments(parser, steps=18000)
    parser.add_argument("--min-items", type=int, default=2, help="fewest items in a sequence")
    parser.add_argument("--max-items", type=int, default=6, help="most items in a sequence")
    parser.add_argument("--bits", type=int, default=6, help="bits per vector")
    parser.add_argument("--item-size", type=int, default=3, help="vectors per item")
    parser.add_argument("--memory-rows", type=int, default=64, help="memory rows N")
    parser.add_argument("--word-size", type=int, default=16, help="memory word size W")
    parser.add_argument("--read-heads", type=int, default=1, help="read heads R")
    parser.add_argument("--controller-size", type=int, default=64, help="LSTM hidden size")
    parser.add_argument("--controller-layers", type=int, default=1, help="LSTM layers")
    parser.add_argument(
        "--no-links", action="store_true",
        help="no temporal link matrix: content reads only, no N x N state per session",
    )  # fmt: skip
    _add_output_arguments(parser, "CPU threads for torch (small DNC steps run fastest on one)")
    parser.set_defaults(handler=run_recall)


def run_recall(args: argparse.Namespace) -> int:
    """Train associative recall as `args` say; the checkpoint records this exact command."""
    import torch

    from models.dnc import DNC, DNCConfig
    from models.tasks.recall import RecallTask, check_recall_arguments
    from models.training import train

    try:
        check_recall_arguments(args.min_items, args.max_items, args.bits, args.item_size)
    except ValueError as error:
        raise ValueError(
            f"{error} (--min-items, --max-items, --bits, --item-size: got {args.min_items}, "
            f"{args.max_items}, {args.bits}, {args.item_size})"
        ) from None
    settings = _settings(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = DNCConfig(
        input_size=args.bits + 2,
        output_size=args.bits,
        memory_rows=args.memory_rows,
        word_size=args.word_size,
        read_heads=args.read_heads,
        controller_size=args.controller_size,
        controller_layers=args.controller_layers,
        use_links=not args.no_links,
    )
    task = RecallTask(args.batch_size, args.min_items, args.max_items, args.bits, args.item_size)
    final = train(
        DNC(config), task, settings, args.out, _command(args), resume=args.resume,
        progress=not args.quiet,
    )  # fmt: skip
    _print_final(final, args.out)
    return 0


def add_dialogue_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`memserve train dialogue` and its options."""
    parser = commands.add_parser(
        "dialogue",
        help="train a VMED dialogue model on Persona-Chat corpora (Le et al. 2018)",
        description=(
            "Train a Variational Memory Encoder-Decoder on whole conversations, as a session "
            "is served: each conversation is written into the DNC memory turn by turn (the "
            "utterance, then <eos>), and every utterance is a reply decoded, with z from the "
            "posterior, from the memory of the conversation before it. The loss is the "
            "replies' cross-entropy plus the KL bound (weight rising linearly over "
            "--kl-warmup steps; --free-bits, --bag-of-words and --word-dropout keep z in "
            "use); backpropagation is truncated every --bptt-turns turns. Training uses the "
            "training split of --corpus and all of --extra-corpus; --validation-fraction of "
            "--corpus's dialogues (chosen by --split-seed) are held out and score every "
            "checkpoint (cross-entropy with z from the prior over whole conversations; the "
            "best is exported). The BPE tokenizer is trained on --corpus's training split "
            "(or taken from --tokenizer) and saved as tokenizer.json. --no-memory trains the "
            "ablation that never reads the memory; --resume continues an interrupted run "
            "exactly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_arguments(parser, steps=DIALOGUE_STEPS)
    parser.add_argument("--corpus", required=True, help="Persona-Chat text file (split, scored)")
    parser.add_argument(
        "--extra-corpus", default="", help="another corpus in that format, all for training"
    )
    parser.add_argument(
        "--corpus-repeat", type=int, default=1,
        help="times each training conversation of --corpus is in the training set",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default="",
        help="a tokenizer.json to use (e.g. another model's, for comparable perplexities) "
        "instead of training one",
    )  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size")
    parser.add_argument(
        "--max-utterance-tokens", type=int, default=32, help="tokens kept of each utterance"
    )
    parser.add_argument("--max-turns", type=int, default=32, help="utterances kept of each")
    parser.add_argument(
        "--bptt-turns", type=int, default=8,
        help="turns between truncations of backpropagation (0: whole conversations)",
    )  # fmt: skip
    parser.add_argument("--kl-warmup", type=int, default=2000, help="steps of KL annealing")
    parser.add_argument(
        "--free-bits", type=float, default=0.0, help="nats of KL per reply left unpenalised"
    )
    parser.add_argument(
        "--bag-of-words", type=float, default=0.0,
        help="weight of the bag-of-words loss (0: no bag-of-words head)",
    )  # fmt: skip
    parser.add_argument(
        "--word-dropout", type=float, default=0.0,
        help="probability that a decoder input token is replaced by <unk> in training",
    )  # fmt: skip
    parser.add_argument(
        "--read-dropout", type=float, default=0.0,
        help="dropout on the memory's read vectors in training (0: none); serving reads whole",
    )  # fmt: skip
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="dialogues held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seeds the held-out choice")
    parser.add_argument("--embedding-size", type=int, default=64, help="token embedding width")
    parser.add_argument("--controller-size", type=int, default=128, help="LSTM hidden size")
    parser.add_argument("--memory-rows", type=int, default=64, help="memory rows N")
    parser.add_argument("--word-size", type=int, default=32, help="memory word size W")
    parser.add_argument("--read-heads", type=int, default=2, help="encoder read heads R")
    parser.add_argument(
        "--mixture-components", type=int, default=4,
        help="decoder read heads K = components of the prior",
    )  # fmt: skip
    parser.add_argument("--latent-size", type=int, default=32, help="width of z")
    parser.add_argument(
        "--usage-decay", type=float, default=1.0,
        help="factor on the memory's usage at every encoder step (1: none; below 1, a full "
        "memory reuses the rows written longest ago first)",
    )  # fmt: skip
    parser.add_argument("--links", action="store_true", help="temporal links in the encoder DNC")
    parser.add_argument(
        "--no-memory-reads", action="store_true",
        help="the CVAE ablation: no decoder reads, a single Gaussian prior",
    )  # fmt: skip
    parser.add_argument(
        "--no-memory", action="store_true",
        help="the no-memory ablation: --no-memory-reads, and the encoder does not read either",
    )  # fmt: skip
    _add_output_arguments(parser, "CPU threads for torch")
    parser.set_defaults(handler=run_dialogue, batch_size=16, checkpoint_every=250, log_every=25)


# What fits in the 2-hour budget on this 2-core machine at the default sizes (docs/models.md).
DIALOGUE_STEPS = 2000


def run_dialogue(args: argparse.Namespace) -> int:
    """Train the dialogue task as `args` say; the checkpoint records this exact command."""
    from pathlib import Path

    import torch

    from models.tasks.dialogue import DialogueTask, read_corpus, split_dialogues, utterances
    from models.tokenizer import TOKENIZER_FILE, tokenizer_from_bytes, train_tokenizer
    from models.training import train
    from models.vmed import VMED, VMEDConfig

    settings = _settings(args)
    torch.set_num_threads(args.threads)
    tokenizer_path = Path(args.out) / TOKENIZER_FILE
    if args.resume and tokenizer_path.is_file():
        tokenizer = tokenizer_from_bytes(tokenizer_path.read_bytes())
    elif args.tokenizer:
        tokenizer = tokenizer_from_bytes(Path(args.tokenizer).read_bytes())
    else:
        training_dialogues, _ = split_dialogues(
            read_corpus(args.corpus), args.validation_fraction, args.split_seed
        )
        tokenizer = train_tokenizer(utterances(training_dialogues), args.vocab_size)
    task = DialogueTask(
        args.corpus,
        tokenizer,
        extra_corpus=args.extra_corpus,
        corpus_repeat=args.corpus_repeat,
        batch_size=args.batch_size,
        max_utterance_tokens=args.max_utterance_tokens,
        max_turns=args.max_turns,
        bptt_turns=args.bptt_turns,
        kl_warmup_steps=args.kl_warmup,
        free_bits=args.free_bits,
        bag_of_words_weight=args.bag_of_words,
        word_dropout=args.word_dropout,
        validation_fraction=args.validation_fraction,
        split_seed=args.split_seed,
    )
    torch.manual_seed(args.seed)
    config = VMEDConfig(
        vocab_size=tokenizer.get_vocab_size(),
        embedding_size=args.embedding_size,
        controller_size=args.controller_size,
        memory_rows=args.memory_rows,
        word_size=args.word_size,
        read_heads=args.read_heads,
        mixture_components=args.mixture_components,
        latent_size=args.latent_size,
        use_links=args.links,
        memory_reads=not (args.no_memory_reads or args.no_memory),
        encoder_reads=not args.no_memory,
        bag_of_words=args.bag_of_words > 0,
        usage_decay=args.usage_decay,
        read_dropout=args.read_dropout,
    )
    final = train(
        VMED(config, tokenizer), task, settings, args.out, _command(args), resume=args.resume,
        progress=not args.quiet,
    )  # fmt: skip
    print(
        f"trained to step {final.get('step')}: loss {final.get('loss', float('nan')):.4g}, "
        f"reply cross-entropy {final.get('ce', float('nan')):.4g}; checkpoint in {args.out}"
    )
    return 0

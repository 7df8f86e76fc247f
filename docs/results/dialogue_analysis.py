"""The numbers behind docs/models.md's dialogue sections that are not an evaluation: the
corpora and the training set, a unigram baseline by turn, and where each model's encoder
memory goes over the held-out conversations. Writes docs/results/dialogue-analysis.json.

    .venv/bin/python docs/results/dialogue_analysis.py MODEL [MODEL ...] > /dev/null

MODEL: a bundled name or a checkpoint directory (its memory statistics are measured). Runs
in about a minute on one core.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from models import load
from models.dnc import split_interface
from models.tasks.dialogue import (
    TURN_BUCKETS,
    Conversation,
    make_conversations,
    read_corpus,
    split_dialogues,
    turn_bucket_label,
    utterance_turns,
    utterances,
)
from models.tokenizer import EOS, train_tokenizer
from models.vmed import VMED

PC = "/work/shared/data/personachat-dialogues.txt"
SYN = "/work/shared/data/synthetic-persona-chat.txt"
OUT = Path(__file__).with_name("dialogue-analysis.json")
MAX_TURNS, MAX_TOKENS, BATCH, REPEAT = 32, 32, 16, 3  # the training defaults and the mix


def corpus_stats(conversations: list[Conversation]) -> dict[str, float]:
    lengths = [len(u) for c in conversations for u in c.utterances]
    turns = [len(c.utterances) for c in conversations]
    return {
        "conversations": len(conversations),
        "utterances": len(lengths),
        "utterances_per_conversation_mean": sum(turns) / len(turns),
        "utterances_per_conversation_max": max(turns),
        "tokens_per_utterance_mean": sum(lengths) / len(lengths),
        f"utterances_over_{MAX_TOKENS}_tokens_share": sum(n > MAX_TOKENS for n in lengths)
        / len(lengths),
        f"conversations_over_{MAX_TURNS}_utterances_share": sum(t > MAX_TURNS for t in turns)
        / len(turns),
    }


def training_set(pc: list[Conversation], syn: list[Conversation]) -> dict[str, float]:
    """As DialogueTask builds it: cut, then counted (replies, reply tokens with <eos>)."""
    replies_pc = sum(len(c.utterances) for c in pc)
    replies_syn = sum(len(c.utterances) for c in syn)
    tokens = [sum(len(u) + 1 for u in c.utterances) for c in pc + syn]
    return {
        "conversations": len(pc) + len(syn),
        "replies": replies_pc + replies_syn,
        "reply_tokens": sum(tokens),
        "persona_chat_share_of_replies": replies_pc / (replies_pc + replies_syn),
        "tokens_written_per_conversation_mean": sum(tokens) / len(tokens),
        "tokens_written_per_conversation_max": max(tokens),
        f"reply_tokens_per_batch_of_{BATCH}_mean": BATCH * sum(tokens) / len(tokens),
    }


def unigram_by_turn(train: list[Conversation], held: list[Conversation], vocab: int) -> Any:
    """Add-one unigram over the training conversations' tokens and <eos>, scored on every
    held-out utterance (and its <eos>): perplexity overall and by turn bucket."""
    counts: Counter[int] = Counter()
    for c in train:
        for u in c.utterances:
            counts.update(u)
            counts[EOS] += 1
    total = sum(counts.values())

    def nll(token: int) -> float:
        return -math.log((counts[token] + 1) / (total + vocab))

    by_index: list[tuple[float, int]] = []
    for c in held:
        for i, u in enumerate(c.utterances):
            while len(by_index) <= i:
                by_index.append((0.0, 0))
            s, n = by_index[i]
            by_index[i] = (s + sum(nll(t) for t in (*u, EOS)), n + len(u) + 1)
    result = {"perplexity": math.exp(sum(s for s, _ in by_index) / sum(n for _, n in by_index))}
    for bucket in range(TURN_BUCKETS):
        chosen = by_index[utterance_turns(bucket)]
        result[f"perplexity_turn_{turn_bucket_label(bucket)}"] = math.exp(
            sum(s for s, _ in chosen) / sum(n for _, n in chosen)
        )
    return result


@torch.no_grad()
def memory_by_turn(model: VMED, held: list[Conversation]) -> dict[str, Any]:
    """The held-out conversations written through `encode` (the serving path), all at once
    in one pool: after each turn bucket's utterances, the usage summed over the rows and the
    rows with usage > 0.5 (means over conversations and utterances), and the write,
    allocation and free gates averaged over the tokens written in the bucket."""
    config = model.config
    gates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = model._encoder_step

    def hooked(*args: Any, **kwargs: Any) -> Any:
        h, c, interface = step(*args, **kwargs)
        parts = split_interface(interface, config.read_heads, config.word_size, config.use_links)
        gates.append((parts.write_gate, parts.allocation_gate, parts.free_gates.mean(-1)))
        return h, c, interface

    model._encoder_step = hooked  # type: ignore[method-assign]
    pool = model.new_pool(len(held))
    slots = torch.arange(len(held))
    model.reset(pool, slots.tolist())
    sums: dict[int, list[list[float]]] = {}
    for turn in range(max(len(c.utterances) for c in held)):
        said = [[*c.utterances[turn], EOS] if turn < len(c.utterances) else [] for c in held]
        gates.clear()
        for position in range(max(len(s) for s in said)):
            live = torch.tensor([position < len(s) for s in said])
            token = torch.tensor([s[position] if position < len(s) else 0 for s in said])
            model.encode(pool, torch.where(live, slots, -1), token)
        usage = pool["usage"][torch.tensor([turn < len(c.utterances) for c in held])]
        values = [
            float(usage.sum(-1).mean()),
            float((usage > 0.5).sum(-1).float().mean()),
            *(float(torch.cat([g[k].flatten() for g in gates]).mean()) for k in range(3)),
        ]
        sums.setdefault(min(turn // 2, TURN_BUCKETS - 1), []).append(values)
    names = ["usage_sum", "rows_over_half", "write_gate", "allocation_gate", "free_gate"]
    return {
        "memory_rows": config.memory_rows,
        "usage_decay": getattr(config, "usage_decay", 1.0),
        "by_turn": {
            turn_bucket_label(b): {
                n: sum(v[i] for v in rows) / len(rows) for i, n in enumerate(names)
            }
            for b, rows in sorted(sums.items())
        },
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    train, held = split_dialogues(read_corpus(PC), 0.1, 0)
    synthetic = read_corpus(SYN)
    tokenizer = train_tokenizer(utterances(train), 2000)
    full = {
        "persona_chat_train": make_conversations(train, tokenizer),
        "persona_chat_held_out": make_conversations(held, tokenizer),
        "synthetic_persona_chat": make_conversations(synthetic, tokenizer),
    }
    pc_cut = make_conversations(train, tokenizer, MAX_TOKENS, MAX_TURNS)
    syn_cut = make_conversations(synthetic, tokenizer, MAX_TOKENS, MAX_TURNS)
    shipped_tokenizer = Path(__file__).parents[2] / "models/checkpoints/vmed-chat/tokenizer.json"
    report: dict[str, Any] = {
        "command": "python docs/results/dialogue_analysis.py " + " ".join(models),
        "corpora": {"persona_chat": PC, "synthetic_persona_chat": SYN, "split_seed": 0},
        "tokenizer": {
            "trained_on": "Persona-Chat training split, 2,000 tokens",
            "same_bytes_as_v1_vmed_chat": tokenizer.to_str()
            == shipped_tokenizer.read_text(encoding="utf-8"),
        },
        "corpus": {name: corpus_stats(c) for name, c in full.items()},
        "training_set": {
            f"corpus_repeat_{k}": training_set(pc_cut * k, syn_cut) for k in (1, REPEAT)
        },
        "unigram_add_one": unigram_by_turn(
            full["persona_chat_train"], full["persona_chat_held_out"], 2000
        ),
        "memory": {},
    }
    for name in models:
        model = load(name)
        assert isinstance(model, VMED)
        report["memory"][name] = memory_by_turn(model, full["persona_chat_held_out"])
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

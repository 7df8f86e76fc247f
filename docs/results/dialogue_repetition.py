"""Where greedy replies lose their variety (docs/models.md, "Greedy replies that repeat
themselves"): on the held-out conversations, as `memserve eval dialogue` generates them
(`generate_conversation_replies`: the serving path, the same seed), for each presence
penalty, how many replies are distinct, the most frequent ones, how many of the replies'
bigrams repeat one of the same reply and one the model said earlier in the same
conversation, and distinct-1/2; the people's replies scored the same way for reference.
Writes docs/results/vmed-chat-presence/repetition.json.

    .venv/bin/python docs/results/dialogue_repetition.py [MODEL] > /dev/null

MODEL: a bundled name or a checkpoint directory (default vmed-chat). Runs in under a
minute on one core.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from models import load
from models.tasks.dialogue import (
    distinct_n,
    generate_conversation_replies,
    make_conversations,
    read_corpus,
    split_dialogues,
)
from models.tokenizer import decode
from models.vmed import VMED

PC = "/work/shared/data/personachat-dialogues.txt"
OUT = Path(__file__).with_name("vmed-chat-presence") / "repetition.json"
SEED, MAX_REPLY_TOKENS = 12345, 32  # memserve eval dialogue's defaults
PENALTIES = (0.0, 0.5, 1.0, 1.5, 2.0)


def bigrams(words: Sequence[str]) -> list[tuple[str, str]]:
    return list(pairwise(words))


def repetition(conversations: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The statistics of one set of replies, a list of texts per conversation."""
    replies = [reply for conversation in conversations for reply in conversation]
    words = [reply.split() for reply in replies]
    total = sum(len(bigrams(w)) for w in words)
    in_reply = sum(len(bigrams(w)) - len(set(bigrams(w))) for w in words)
    in_conversation = 0  # bigrams said before in the conversation, this reply included
    for conversation in conversations:
        seen: set[tuple[str, str]] = set()
        for reply in conversation:
            for gram in bigrams(reply.split()):
                in_conversation += gram in seen
                seen.add(gram)
    counts = Counter(replies)
    return {
        "replies": len(replies),
        "distinct_replies": len(counts),
        "most_frequent_replies": counts.most_common(5),
        "bigrams": total,
        "bigrams_repeated_within_their_reply": in_reply,
        "bigrams_said_before_in_the_conversation": in_conversation,
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "mean_reply_words": sum(map(len, words)) / max(1, len(words)),
    }


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = load(name)
    if not isinstance(model, VMED) or model.tokenizer is None:
        raise SystemExit(f"{name} is not a VMED dialogue model")
    tokenizer = model.tokenizer
    _, held = split_dialogues(read_corpus(PC), 0.1, 0)
    conversations = make_conversations(held, tokenizer)
    report: dict[str, Any] = {
        "command": "python docs/results/dialogue_repetition.py " + name,
        "model": name,
        "corpus": PC,
        "seed": SEED,
        "decoding": "greedy, z from the prior, as memserve eval dialogue",
        "people": repetition([list(c.texts) for c in conversations]),
        "presence_penalty": {},
    }
    for penalty in PENALTIES:
        generated = generate_conversation_replies(
            model, conversations, SEED, MAX_REPLY_TOKENS, presence_penalty=penalty
        )
        texts = [[decode(tokenizer, reply) for reply in replies] for replies in generated]
        report["presence_penalty"][str(penalty)] = repetition(texts)
        print(penalty, json.dumps(report["presence_penalty"][str(penalty)])[:300], flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vmed-chat")

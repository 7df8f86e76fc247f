"""A small VMED with random weights for the serving and benchmark tests: its tokenizer is
trained on the first utterances of the shared Persona-Chat file, and its output bias makes
<eos> impossible, so every reply runs to max_tokens (lengths the tests can count on)."""

from __future__ import annotations

from pathlib import Path

import torch

from models import checkpoint
from models.tokenizer import EOS, train_tokenizer
from models.vmed import VMED, VMEDConfig

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "personachat-dialogues.txt"


def utterances(count: int) -> list[str]:
    """The first `count` utterances (both speakers) of the corpus's exchange lines."""
    lines: list[str] = []
    for line in CORPUS.read_text().splitlines():
        if "\t" in line:
            lines.extend(line.split(" ", 1)[1].split("\t"))
        if len(lines) >= count:
            break
    return lines[:count]


def tiny_vmed(directory: Path) -> tuple[Path, VMED]:
    """Save the model as checkpoint `directory`; returns it with the model (eval mode)."""
    tokenizer = train_tokenizer(utterances(400), 300)
    torch.manual_seed(7)
    config = VMEDConfig(vocab_size=tokenizer.get_vocab_size(), embedding_size=16,
                        controller_size=16, memory_rows=8, word_size=8, read_heads=1,
                        mixture_components=2, latent_size=4, mlp_size=8)  # fmt: skip
    model = VMED(config, tokenizer)
    with torch.no_grad():
        model.output.bias[EOS] = -1e4
    return checkpoint.save(model, directory, {"task": "test"}), model.eval()

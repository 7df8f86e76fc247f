"""CPU seconds of one training step of `memserve train dialogue` (the task's forward and
backward over a batch of whole conversations; the optimiser's step is not counted), one
thread, for the memory sizes and options docs/models.md compares, on the same batches.
Process CPU time, so that a busy machine slows the run down but not the figures much.
Writes docs/results/dialogue-step-cost.json.

    .venv/bin/python docs/results/dialogue_step_cost.py > /dev/null
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from models.tasks.dialogue import DialogueTask, read_corpus, split_dialogues, utterances
from models.tokenizer import train_tokenizer
from models.vmed import VMED, VMEDConfig

PC = "/work/shared/data/personachat-dialogues.txt"
SYN = "/work/shared/data/synthetic-persona-chat.txt"
OUT = Path(__file__).with_name("dialogue-step-cost.json")
STEPS = 4  # batches timed per variant (the same batches for every variant of a batch size)
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "64 rows (default)": (16, {}),
    "128 rows": (16, {"memory_rows": 128}),
    "64 rows, usage_decay 0.98": (16, {"usage_decay": 0.98}),
    "no memory (--no-memory)": (16, {"memory_reads": False, "encoder_reads": False}),
    "64 rows, batch 32": (32, {}),
}


def main() -> None:
    torch.set_num_threads(1)
    train, _ = split_dialogues(read_corpus(PC), 0.1, 0)
    tokenizer = train_tokenizer(utterances(train), 2000)
    tasks = {
        size: DialogueTask(PC, tokenizer, extra_corpus=SYN, corpus_repeat=3, batch_size=size)
        for size in {size for size, _ in VARIANTS.values()}
    }
    results: dict[str, Any] = {}
    for name, (size, options) in VARIANTS.items():
        torch.manual_seed(0)
        model = VMED(VMEDConfig(vocab_size=tokenizer.get_vocab_size(), **options), tokenizer)
        generator = torch.Generator().manual_seed(1)
        seconds = []
        for step in range(STEPS):
            model.zero_grad()
            start = time.process_time()
            tasks[size].accumulate_gradients(model, generator, torch.device("cpu"), step)
            seconds.append(time.process_time() - start)
        results[name] = {"batch_size": size, "cpu_seconds_per_step": seconds}
        results[name]["mean"] = sum(seconds) / len(seconds)
        print(name, [round(s, 2) for s in seconds], flush=True)
    report = {
        "command": "python docs/results/dialogue_step_cost.py",
        "what": "CPU seconds (time.process_time) of DialogueTask.accumulate_gradients, one "
        "thread, corpus_repeat 3 with Synthetic-Persona-Chat, the same batches per batch size",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "torch thread, torch " + torch.__version__,
        "variants": results,
    }
    OUT.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Copy a finished run's checkpoint into models/checkpoints/vmed-chat and add to its provenance
where its data came from (the corpora's source and licence; the training command names only
their paths). The training state and the loss log stay behind.

    .venv/bin/python docs/results/export_vmed_chat.py RUN_DIR models/checkpoints/vmed-chat
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

run, target = Path(sys.argv[1]), Path(sys.argv[2])
target.mkdir(parents=True, exist_ok=True)
for name in ("model.safetensors", "tokenizer.json"):
    shutil.copyfile(run / name, target / name)
config = json.loads((run / "config.json").read_text())
settings = config["provenance"]["task_settings"]


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


config["provenance"]["data"] = [
    {
        "path": settings["corpus"],
        "sha256": sha256(settings["corpus"]),
        "use": "training split (x corpus_repeat) and the held-out dialogues of the evaluation",
        "source": "Persona-Chat (Zhang et al. 2018, 'Personalizing Dialogue Agents: I have a "
        "dog, do you have pets too?'), 900 dialogues of its validation split",
    },
    {
        "path": settings["extra_corpus"],
        "sha256": sha256(settings["extra_corpus"]),
        "use": "training only (all 1,904 conversations, cut to max_turns and max_utterance_tokens)",
        "source": "Synthetic-Persona-Chat (Jandaghi, Sheng, Bai, Pujara, Sidahmed 2023, 'Faithful "
        "Persona-based Conversational Dataset Generation with Large Language Models', "
        "arXiv:2312.10007), its validation and test splits, converted to the Persona-Chat "
        "text format",
        "publisher": "google-research-datasets/Synthetic-Persona-Chat",
        "licence": "Creative Commons Attribution 4.0 International (CC BY 4.0)",
    },
]
(target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
print(f"exported {run} -> {target}")

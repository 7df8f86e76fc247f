"""The dialogue task: the corpus format, the split, examples and batches, the metrics against
hand-computed values, and `memserve train dialogue` / `memserve eval dialogue` end to end on
a small synthetic corpus."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memserve.cli import main
from models import load
from models.tasks.dialogue import (
    Dialogue,
    collate,
    corpus_bleu,
    distinct_n,
    draw_batch,
    kl_weight,
    make_examples,
    parse_dialogues,
    split_dialogues,
)
from models.tokenizer import BOS, EOS, PAD, train_tokenizer
from models.vmed import VMED
from tests.tiny_vmed import CORPUS as PERSONA_CHAT

CORPUS = (
    "1 your persona: i like dogs.\n"
    "2 partner's persona: i am a teacher.\n"
    "3 hi , how are you ?\ti am fine .\n"
    "4 do you like dogs ?\tyes , i love dogs .\n"
    "1 your persona: i read.\n"
    "2 hello !\tgood morning .\n"
    "3 bye .\n"
)


def test_parsing_reads_personas_and_alternating_utterances() -> None:
    dialogues = parse_dialogues(CORPUS)
    first = ("hi , how are you ?", "i am fine .", "do you like dogs ?", "yes , i love dogs .")
    assert dialogues == [
        Dialogue(("i like dogs.",), ("i am a teacher.",), first),
        Dialogue(("i read.",), (), ("hello !", "good morning .", "bye .")),
    ]


def test_parsing_edge_cases() -> None:
    # Windows line ends, blank lines, spaces around a tab, a trailing empty utterance
    text = "1 a b\t c \r\n\n2 d\t\r\n"
    assert parse_dialogues(text) == [Dialogue((), (), ("a b", "c", "d"))]
    # a dialogue of personas only is dropped; an empty file has no dialogues
    assert parse_dialogues("1 your persona: x\n1 hi\tho\n") == [Dialogue((), (), ("hi", "ho"))]
    assert parse_dialogues("") == []
    errors = {
        "hello\tthere\n": "corpus:1: a line must start with its number",
        "1 a\tb\n3 c\td\n": "corpus:2: line number 3, expected 2",
        "2 a\tb\n": "corpus:1: line number 2, expected 1",
        "1 a\tb\tc\n": "corpus:1: an exchange holds one or two",
        "1 a\tb\n2 \t \n": "corpus:2: an exchange holds one or two tab-separated utterances, got 0",
    }
    for text, message in errors.items():
        with pytest.raises(ValueError, match=message):
            parse_dialogues(text)


def test_the_split_is_deterministic_disjoint_and_by_dialogue() -> None:
    dialogues = [Dialogue((), (), (f"utterance {i}",)) for i in range(50)]
    train, validation = split_dialogues(dialogues, 0.1, seed=3)
    assert len(validation) == 5 and len(train) == 45
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(dialogues)
    assert split_dialogues(dialogues, 0.1, seed=3) == (train, validation)
    assert split_dialogues(dialogues, 0.1, seed=4)[1] != validation
    assert train == [d for d in dialogues if d in train]  # corpus order kept
    with pytest.raises(ValueError, match="fraction"):
        split_dialogues(dialogues, 1.0, 0)


def test_examples_and_batches() -> None:
    tokenizer = train_tokenizer(["a b c d e f", "a b", "c d e"], 30)
    dialogue = Dialogue((), (), ("a b", "c d e", "f", "a"))
    ids = {word: tokenizer.token_to_id("▁" + word) for word in "abcdef"}
    examples = make_examples([dialogue], tokenizer, context_utterances=2, max_utterance_tokens=2)
    assert [e.reply_text for e in examples] == ["a b", "c d e", "f", "a"]
    assert examples[0].context == ()
    assert examples[1].context == (ids["a"], ids["b"], EOS)
    assert examples[2].reply == (ids["f"],)
    # two utterances of context, each cut to two tokens and ended by <eos>
    assert examples[3].context == (ids["c"], ids["d"], EOS, ids["f"], EOS)
    batch = collate(examples[:2])
    assert batch.context.tolist() == [[PAD, PAD, PAD], [ids["a"], ids["b"], EOS]]
    assert batch.context_mask.tolist() == [[False] * 3, [True] * 3]
    assert batch.reply_inputs.tolist() == [[BOS, ids["a"], ids["b"]], [BOS, ids["c"], ids["d"]]]
    assert batch.reply_targets.tolist() == [[ids["a"], ids["b"], EOS], [ids["c"], ids["d"], EOS]]
    assert batch.reply_lengths.tolist() == [3, 3]


def test_batches_come_from_one_bucket_and_the_kl_weight_warms_up(
    generator: torch.Generator,
) -> None:
    for _ in range(20):
        chosen = draw_batch(1000, 8, generator)
        assert chosen.shape == (8,) and int(chosen.min()) >= 0 and int(chosen.max()) < 1000
        assert int(chosen.max() - chosen.min()) < 32
    assert draw_batch(5, 8, generator).max() < 5
    assert [kl_weight(step, 4) for step in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_weight(1, 0) == 1.0


def test_bleu_against_hand_computed_values() -> None:
    hypotheses = [["the", "cat", "sat", "on", "the", "mat"], ["hello", "there"]]
    references = [["the", "cat", "sat", "on", "a", "mat"], ["hello", "there", "friend"]]
    # sentence 1 alone: precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    assert corpus_bleu(hypotheses[:1], references[:1], 1) == pytest.approx(5 / 6)
    assert corpus_bleu(hypotheses[:1], references[:1], 4) == pytest.approx((1 / 12) ** 0.25)
    # the corpus: counts summed, 7/8, 4/6, 2/4, 1/3; 8 words against 9: exp(1 - 9/8)
    brevity = math.exp(1 - 9 / 8)
    assert corpus_bleu(hypotheses, references, 1) == pytest.approx(brevity * 7 / 8)
    assert corpus_bleu(hypotheses, references, 4) == pytest.approx(brevity * (7 / 72) ** 0.25)
    assert corpus_bleu([["a", "b"]], [["c", "d"]], 4) == 0.0
    assert corpus_bleu([[]], [["c"]], 1) == 0.0
    assert corpus_bleu([["a", "a", "a"]], [["a"]], 1) == pytest.approx(1 / 3)  # clipped


def test_distinct_n() -> None:
    sentences = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(sentences, 1) == pytest.approx(2 / 5)
    assert distinct_n(sentences, 2) == pytest.approx(2 / 3)
    assert distinct_n([["a"]], 2) == 0.0


ANIMALS = ["dogs", "cats", "birds", "fish", "horses", "rabbits"]


def synthetic_corpus(path: Path, dialogues: int = 60) -> Path:
    """Dialogues whose replies repeat a word of the context: learnable in seconds."""
    rng = random.Random(7)
    lines = []
    for _ in range(dialogues):
        lines.append("1 your persona: i like animals.")
        first, second = rng.sample(ANIMALS, 2)
        exchanges = [
            ("hi , how are you ?", "i am fine , thanks ."),
            (f"do you like {first} ?", f"yes , i love {first} ."),
            (f"i have two {second} .", f"two {second} ? nice ."),
        ]
        for number, (a, b) in enumerate(exchanges, start=2):
            lines.append(f"{number} {a}\t{b}")
    path.write_text("\n".join(lines) + "\n")
    return path


SMALL = [
    "--vocab-size", "60", "--embedding-size", "12", "--controller-size", "24",
    "--memory-rows", "12", "--word-size", "8", "--mixture-components", "2",
    "--latent-size", "4", "--batch-size", "16", "--context-utterances", "2",
    "--kl-warmup", "20", "--lr", "1e-2", "--quiet",
]  # fmt: skip


def train(corpus: Path, out: Path, *extra: str) -> int:
    return main(["train", "dialogue", "--corpus", str(corpus), "--out", str(out), *SMALL, *extra])


def test_training_lowers_the_validation_loss_and_eval_scores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")  # generation steps many sessions
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "80", "--checkpoint-every", "10", "--log-every", "10") == 0
    run = json.loads((out / "training.json").read_text())
    validations = [record["ce"] for record in run["validations"]]
    assert len(validations) == 8
    assert min(validations[-3:]) < 0.7 * validations[0]
    model = load(out)
    assert isinstance(model, VMED) and model.tokenizer is not None
    assert model.config.memory_reads and model.config.mixture_components == 2
    assert model.provenance["task"] == "dialogue"
    assert model.provenance["task_settings"]["context_utterances"] == 2
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()

    report = tmp_path / "eval.json"
    arguments = ["eval", "dialogue", "--model", str(out), "--corpus", str(corpus)]
    assert main([*arguments, "--json", str(report), "--max-reply-tokens", "8"]) == 0
    table = capsys.readouterr().out
    result = json.loads(report.read_text())
    metrics = result["metrics"]
    assert metrics["examples"] == 6 * 6  # 6 held-out dialogues of 6 utterances
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["cross_entropy"]))
    assert metrics["perplexity"] < 60
    for key in ("bleu_1", "bleu_4", "distinct_1", "distinct_2"):
        assert 0 <= metrics[key] <= 1
    assert metrics["bleu_1"] > 0
    assert f"{metrics['perplexity']:.4f}" in table
    assert result["split"] == {"validation_fraction": 0.1, "split_seed": 0}


def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after its step-4 checkpoint and resumed (with its saved tokenizer) ends
    bit-identical to the run left alone; the ablation trains too."""
    corpus = synthetic_corpus(tmp_path / "corpus.txt", dialogues=20)
    options = ["--steps", "8", "--checkpoint-every", "4", "--no-memory-reads"]
    assert train(corpus, tmp_path / "straight", *options) == 0

    from models.tasks.dialogue import DialogueTask

    original = DialogueTask.loss

    def stop_at_step_6(self: DialogueTask, *args: object, **kwargs: object) -> object:
        if args[-1] == 6:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DialogueTask, "loss", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(corpus, tmp_path / "split", *options)
    monkeypatch.setattr(DialogueTask, "loss", original)
    assert train(corpus, tmp_path / "split", *options, "--resume") == 0
    for name in ("training-state.safetensors", "model.safetensors"):
        straight = load_file(tmp_path / "straight" / name)
        split = load_file(tmp_path / "split" / name)
        assert straight.keys() == split.keys()
        for key, tensor in straight.items():
            assert torch.equal(tensor, split[key]), (name, key)
    model = load(tmp_path / "split")
    assert isinstance(model, VMED) and not model.config.memory_reads


def corpus_slice(path: Path, dialogues: int) -> Path:
    """The first `dialogues` dialogues of the shared Persona-Chat file."""
    kept, count = [], 0
    for line in PERSONA_CHAT.read_text().splitlines():
        if line.startswith("1 "):
            count += 1
            if count > dialogues:
                break
        kept.append(line)
    path.write_text("\n".join(kept) + "\n")
    return path


def test_a_short_run_on_a_slice_of_the_corpus_lowers_the_validation_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    corpus = corpus_slice(tmp_path / "slice.txt", 40)
    out = tmp_path / "run"
    small = [*SMALL]
    small[small.index("--vocab-size") + 1] = "200"
    code = main(["train", "dialogue", "--corpus", str(corpus), "--out", str(out), *small,
                 "--steps", "90", "--checkpoint-every", "30", "--log-every", "30"])  # fmt: skip
    assert code == 0
    validations = [r["ce"] for r in json.loads((out / "training.json").read_text())["validations"]]
    assert len(validations) == 3
    uniform = math.log(
        json.loads((out / "config.json").read_text())["hyperparameters"]["vocab_size"]
    )
    assert validations[0] < uniform  # below guessing after 30 steps...
    assert validations[-1] < validations[0] - 0.05  # ...and still falling

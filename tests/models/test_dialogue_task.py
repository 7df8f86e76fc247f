"""The dialogue task: the corpus format, the split, conversations and the tensors of a turn,
the batched passes over whole conversations against one session at a time on the serving
path, the loss's gradient, the metrics against hand-computed values, and `memserve train
dialogue` / `memserve eval dialogue` end to end on a small synthetic corpus."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memserve.cli import main
from models import load
from models.tasks.dialogue import (
    Conversation,
    Dialogue,
    DialogueTask,
    bag_of_words_loss,
    collate_conversations,
    conversation_order,
    conversation_scores,
    corpus_bleu,
    distinct_n,
    draw_batch,
    generate_conversation_replies,
    kl_weight,
    make_conversations,
    parse_dialogues,
    split_dialogues,
    turn_tensors,
)
from models.tokenizer import BOS, EOS, PAD, train_tokenizer
from models.training import batch_generator
from models.vmed import VMED
from tests.conftest import relative_error
from tests.models.test_vmed import VOCAB, random_vmed
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


def test_conversations_and_the_tensors_of_a_turn() -> None:
    tokenizer = train_tokenizer(["a b c d e f", "a b", "c d e"], 30)
    ids = {word: tokenizer.token_to_id("▁" + word) for word in "abcdef"}
    long = Dialogue((), (), ("a b", "c d e", "f", "a"))
    short = Dialogue((), (), ("e", "a b c"))
    whole = make_conversations([long], tokenizer)[0]
    assert whole.utterances == ((ids["a"], ids["b"]), (ids["c"], ids["d"], ids["e"]),
                                (ids["f"],), (ids["a"],))  # fmt: skip
    assert whole.texts == long.utterances
    cut = make_conversations([short, long], tokenizer, max_utterance_tokens=2, max_turns=3)
    assert cut[1].utterances == ((ids["a"], ids["b"]), (ids["c"], ids["d"]), (ids["f"],))
    assert cut[1].texts == ("a b", "c d e", "f")
    assert conversation_order(cut) == [1, 0]
    with pytest.raises(ValueError, match="most turns first"):
        collate_conversations(cut)
    batch = collate_conversations([cut[1], cut[0]])
    assert batch.lengths.tolist() == [[2, 2, 1], [1, 2, 0]]
    assert batch.present.tolist() == [[True, True, True], [True, True, False]]
    first = turn_tensors(batch, 0)
    assert first.rows == 2
    assert first.reply_inputs.tolist() == [[BOS, ids["a"], ids["b"]], [BOS, ids["e"], PAD]]
    assert first.reply_targets.tolist() == [[ids["a"], ids["b"], EOS], [ids["e"], EOS, PAD]]
    assert first.reply_lengths.tolist() == [3, 2]
    assert first.mask.tolist() == [[True, True, True], [True, True, False]]
    last = turn_tensors(batch, 2)  # only the longer conversation has a third turn
    assert last.rows == 1
    assert last.reply_inputs.tolist() == [[BOS, ids["f"]]]
    assert last.reply_targets.tolist() == [[ids["f"], EOS]]


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


def test_bag_of_words_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[3, 3, EOS, PAD], [1, EOS, PAD, PAD]])
    log_p = torch.log_softmax(logits, dim=-1)
    expected = -(2 * log_p[0, 3] + log_p[1, 1])  # <eos> and <pad> are not words
    assert float(bag_of_words_loss(logits, targets)) == pytest.approx(float(expected))


def random_conversations(
    turns: list[int], generator: torch.Generator, longest: int = 5
) -> list[Conversation]:
    """Conversations of the given numbers of turns, utterances of 1..longest random tokens."""
    conversations = []
    for count in turns:
        utterances = tuple(
            tuple(torch.randint(4, VOCAB, (int(torch.randint(1, longest + 1, (1,),
                                generator=generator)),), generator=generator).tolist())
            for _ in range(count)
        )  # fmt: skip
        conversations.append(Conversation(utterances, ("x",) * count))
    return conversations


@pytest.mark.parametrize("reads", ["memory", "usage decay", "no decoder reads", "no memory"])
def test_conversation_scores_are_what_the_serving_path_computes(
    reads: str, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Whole conversations of different lengths scored in batches (rows dropping out as
    their conversations end) give, turn by turn, the cross-entropy of teacher-forced
    `decode` calls on a pool in which each session's conversation is written token by
    token with `encode` and each reply starts with `begin_reply`, with the same noise."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(
        generator,
        memory_reads=reads in ("memory", "usage decay"),
        encoder_reads=reads != "no memory",
        usage_decay=0.9 if reads == "usage decay" else 1.0,
    )
    conversations = random_conversations([3, 6, 1, 4], generator)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    scores = conversation_scores(model, conversations, torch.device("cpu"), seed, batch_size=3)

    latent = model.config.latent_size
    noise_generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(4, 6, 2 * latent, generator=noise_generator)
    uniform = torch.rand(4, 6, generator=noise_generator)
    expected = [0.0] * 6
    pool = model.new_pool(2)
    for index, conversation in enumerate(conversations):
        model.reset(pool, [1])
        slot = torch.tensor([1])
        for turn, utterance in enumerate(conversation.utterances):
            model.begin_reply(pool, slot, noise[index, turn : turn + 1, :latent],
                              uniform[index, turn : turn + 1])  # fmt: skip
            for previous, target in zip((BOS, *utterance), (*utterance, EOS), strict=True):
                logits = model.decode(pool, slot, torch.tensor([previous]))
                expected[turn] -= float(torch.log_softmax(logits, dim=-1)[0, target])
            for token in (*utterance, EOS):
                model.encode(pool, slot, torch.tensor([token]))
    assert scores.replies == [4.0, 3.0, 3.0, 2.0, 1.0, 1.0]
    for turn in range(6):
        assert scores.prior_ce[turn] == pytest.approx(expected[turn], rel=1e-5)
    tokens = [sum(len(c.utterances[t]) + 1 for c in conversations if t < len(c.utterances))
              for t in range(6)]  # fmt: skip
    assert scores.tokens == tokens


@pytest.mark.parametrize("penalty", [0.0, 1.5])
def test_generated_replies_are_those_of_one_conversation_at_a_time(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator, penalty: float
) -> None:
    """Batched greedy generation over conversations of different lengths gives, for each,
    the replies of a session that alone draws z with the same noise, decodes greedily and
    then writes the real utterance; with a presence penalty, greedily after taking it off
    the logits of the tokens this test saw the session given before in the conversation."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator)
    conversations = random_conversations([2, 5, 3], generator)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    replies = generate_conversation_replies(
        model, conversations, seed, 6, batch_size=2, presence_penalty=penalty
    )
    if penalty:  # the penalty changes some reply: the reference below is not plain greedy
        assert replies != generate_conversation_replies(model, conversations, seed, 6)

    noise_generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, 5, model.config.latent_size, generator=noise_generator)
    uniform = torch.rand(3, 5, generator=noise_generator)
    pool = model.new_pool(1)
    slot = torch.tensor([0])
    for index, conversation in enumerate(conversations):
        model.reset(pool, [0])
        expected, given = [], set()
        for turn, utterance in enumerate(conversation.utterances):
            model.begin_reply(pool, slot, noise[index, turn : turn + 1],
                              uniform[index, turn : turn + 1])  # fmt: skip
            reply, previous = [], BOS
            for _ in range(6):
                logits = model.decode(pool, slot, torch.tensor([previous]))[0]
                if previous != BOS:
                    given.add(previous)
                logits[sorted(given)] -= penalty
                previous = int(logits.argmax())
                if previous == EOS:
                    break
                reply.append(previous)
            expected.append(reply)
            for token in (*utterance, EOS):
                model.encode(pool, slot, torch.tensor([token]))
        assert replies[index] == expected


def small_task(tmp_path: Path, **settings: object) -> DialogueTask:
    corpus = synthetic_corpus(tmp_path / "corpus.txt", dialogues=10)
    return DialogueTask(str(corpus), train_tokenizer(["x"], 30), **settings)  # type: ignore[arg-type]


def gradients(model: VMED) -> dict[str, torch.Tensor]:
    return {
        name: parameter.grad.clone() if parameter.grad is not None
        else torch.zeros_like(parameter)
        for name, parameter in model.named_parameters()
    }  # fmt: skip


def test_a_batch_gradient_is_the_token_weighted_sum_of_its_conversations(
    tmp_path: Path, generator: torch.Generator
) -> None:
    """The batched loss over whole conversations (rows dropping out as their conversations
    end, backpropagation never truncated) has the gradient of each conversation's own loss,
    weighted by its share of the tokens; truncating every turn keeps the loss and changes
    the gradient; a truncation beyond the last turn changes nothing."""
    model = random_vmed(generator).train()
    conversations = random_conversations([4, 2, 3], generator)
    conversations = [conversations[i] for i in conversation_order(conversations)]
    batch = collate_conversations(conversations)
    rows, turns, longest = batch.tokens.shape
    noise = torch.randn(rows, turns, model.config.latent_size, generator=generator)
    dropped = torch.zeros(rows, turns, longest + 1, dtype=torch.bool)

    def backward(task: DialogueTask, rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        single = collate_conversations(conversations[rows])
        loss, _ = task.backward(model, single, noise[rows, : single.tokens.shape[1]],
                                dropped[rows, : single.tokens.shape[1]], step=10)  # fmt: skip
        return loss, gradients(model)

    whole = small_task(tmp_path, bptt_turns=0, kl_warmup_steps=20)
    loss, batched = backward(whole, slice(None))
    tokens = [sum(len(u) + 1 for u in c.utterances) for c in conversations]
    expected = {name: torch.zeros_like(value) for name, value in batched.items()}
    expected_loss = 0.0
    for row in range(rows):
        single_loss, single = backward(whole, slice(row, row + 1))
        share = tokens[row] / sum(tokens)
        expected_loss += share * single_loss
        for name, value in single.items():
            expected[name] += share * value
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for name, value in batched.items():
        assert relative_error(value, expected[name]) < 1e-4, name

    beyond_loss, beyond = backward(
        small_task(tmp_path, bptt_turns=turns, kl_warmup_steps=20), slice(None)
    )
    assert beyond_loss == loss
    assert all(torch.equal(beyond[name], value) for name, value in batched.items())
    truncated_loss, truncated = backward(small_task(tmp_path, bptt_turns=1, kl_warmup_steps=20),
                                         slice(None))  # fmt: skip
    assert truncated_loss == pytest.approx(loss, rel=1e-6)
    assert relative_error(truncated["encoder_interface.weight"],
                          batched["encoder_interface.weight"]) > 1e-3  # fmt: skip


def test_free_bits_leave_the_prior_without_gradient_below_them(
    tmp_path: Path, generator: torch.Generator
) -> None:
    """The prior learns only through the KL term: with every reply's KL below the free bits,
    its parameters get no gradient; without free bits they do."""
    model = random_vmed(generator).train()
    conversations = random_conversations([3, 3], generator)
    batch = collate_conversations(conversations)
    rows, turns, longest = batch.tokens.shape
    noise = torch.randn(rows, turns, model.config.latent_size, generator=generator)
    dropped = torch.rand(rows, turns, longest + 1, generator=generator) < 0.3
    for free_bits, expect_gradient in ((0.0, True), (1e6, False)):
        model.zero_grad()
        task = small_task(tmp_path, free_bits=free_bits, kl_warmup_steps=0, word_dropout=0.3)
        task.backward(model, batch, noise, dropped, step=1)
        prior = gradients(model)["prior.out.weight"]
        assert bool((prior != 0).any()) == expect_gradient


def test_read_dropout_trains_repeatably_and_leaves_serving_alone(
    tmp_path: Path, generator: torch.Generator
) -> None:
    """Dropout on the memory's reads: a batch's gradient is a function of (seed, step) alone
    (the same twice, whatever torch's global generator held, which it leaves as it was),
    differs from the gradient without dropout, and in eval mode (serving, evaluation) the
    network computes exactly what the same weights without dropout do."""
    base = random_vmed(generator)
    dropping = VMED(replace(base.config, read_dropout=0.5))
    dropping.load_state_dict(base.state_dict())
    short = {"batch_size": 2, "max_turns": 3, "max_utterance_tokens": 6}
    task = small_task(tmp_path, kl_warmup_steps=0, **short)

    def batch_gradient(model: VMED) -> dict[str, torch.Tensor]:
        model.train().zero_grad()
        task.accumulate_gradients(model, batch_generator(7, 3), torch.device("cpu"), step=3)
        return gradients(model)

    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    first = batch_gradient(dropping)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(2)
    again = batch_gradient(dropping)
    assert all(torch.equal(again[name], value) for name, value in first.items())
    whole = batch_gradient(base)
    assert relative_error(first["read_interface.weight"], whole["read_interface.weight"]) > 1e-2

    cpu = torch.device("cpu")
    scored = task.train_conversations[:2]  # short ones; validation and evaluation score so
    assert conversation_scores(dropping.eval(), scored, cpu) == conversation_scores(
        base.eval(), scored, cpu
    )
    with pytest.raises(ValueError, match="read_dropout must be in"):
        replace(base.config, read_dropout=1.0)


ANIMALS = ["dogs", "cats", "birds", "fish", "horses", "rabbits"]


def synthetic_corpus(path: Path, dialogues: int = 60) -> Path:
    """Dialogues whose replies repeat a word said earlier: learnable in seconds."""
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
    "--latent-size", "4", "--batch-size", "8", "--bptt-turns", "4",
    "--kl-warmup", "20", "--lr", "1e-2", "--quiet",
]  # fmt: skip


def train(corpus: Path, out: Path, *extra: str) -> int:
    return main(["train", "dialogue", "--corpus", str(corpus), "--out", str(out), *SMALL, *extra])


def test_training_lowers_the_validation_loss_and_eval_scores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")  # generation steps many sessions
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    extra = synthetic_corpus(tmp_path / "extra.txt", dialogues=5)
    out = tmp_path / "run"
    options = ["--steps", "60", "--checkpoint-every", "10", "--log-every", "10"]
    assert train(corpus, out, *options, "--extra-corpus", str(extra), "--bag-of-words", "0.5") == 0
    run = json.loads((out / "training.json").read_text())
    validations = [record["ce"] for record in run["validations"]]
    assert len(validations) == 6
    assert min(validations[-3:]) < 0.7 * validations[0]
    assert "bow" in run["history"][-1] and "kl_per_token" in run["history"][-1]
    model = load(out)
    assert isinstance(model, VMED) and model.tokenizer is not None
    assert model.config.memory_reads and model.config.mixture_components == 2
    assert model.config.bag_of_words
    assert model.provenance["task"] == "dialogue"
    assert model.provenance["task_settings"]["extra_corpus"] == str(extra)
    assert model.provenance["task_settings"]["bptt_turns"] == 4
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()

    report = tmp_path / "eval.json"
    arguments = ["eval", "dialogue", "--model", str(out), "--corpus", str(corpus)]
    assert main([*arguments, "--json", str(report), "--max-reply-tokens", "8"]) == 0
    table = capsys.readouterr().out
    result = json.loads(report.read_text())
    metrics = result["metrics"]
    assert metrics["conversations"] == 6 and metrics["replies"] == 6 * 6  # held out: 6 of 60
    assert [metrics[f"replies_turn_{turn}"] for turn in "123"] == [12, 12, 12]
    assert metrics["replies_turn_7+"] == 0 and math.isnan(metrics["perplexity_turn_7+"])
    tokens = metrics["tokens"]
    by_turn = sum(math.log(metrics[f"perplexity_turn_{turn}"]) * metrics[f"replies_turn_{turn}"]
                  for turn in "123")  # fmt: skip
    assert by_turn > 0 and tokens > 36
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["cross_entropy"]))
    assert metrics["perplexity"] < 30
    for key in ("bleu_1", "bleu_4", "distinct_1", "distinct_2", "replies_changed_by_z"):
        assert 0 <= metrics[key] <= 1
    assert metrics["bleu_1"] > 0 and metrics["kl_per_token"] >= 0
    assert f"{metrics['perplexity']:.4f}" in table
    assert result["split"] == {"validation_fraction": 0.1, "split_seed": 0}


def test_the_task_trains_on_both_corpora_and_validates_on_the_first(tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.txt", dialogues=20)
    extra = synthetic_corpus(tmp_path / "extra.txt", dialogues=7)
    tokenizer = train_tokenizer(["x"], 30)
    task = DialogueTask(str(corpus), tokenizer, extra_corpus=str(extra), max_turns=5)
    train_split, held_out = split_dialogues(parse_dialogues(corpus.read_text()), 0.1, 0)
    assert len(task.train_conversations) == len(train_split) + 7
    assert [c.texts for c in task.validation_conversations] == [d.utterances for d in held_out]
    assert all(len(c.utterances) == 5 for c in task.train_conversations)
    assert all(len(c.utterances) == 6 for c in task.validation_conversations)  # never cut
    weighed = DialogueTask(str(corpus), tokenizer, extra_corpus=str(extra), corpus_repeat=3)
    assert len(weighed.train_conversations) == 3 * len(train_split) + 7


@pytest.mark.parametrize(
    "variant",
    [
        ["--no-memory", "--word-dropout", "0.2"],
        ["--usage-decay", "0.9", "--free-bits", "1", "--kl-warmup", "2", "--read-dropout", "0.3"],
    ],
    ids=["no memory", "memory"],
)
def test_an_interrupted_run_resumes_to_the_same_weights(
    variant: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after its step-4 checkpoint and resumed (with its saved tokenizer) ends
    bit-identical to the run left alone: the no-memory ablation (with word dropout's random
    draws), and the memory model as shipped runs train it (free bits) with a usage decay and
    read dropout (whose masks come from torch's global generator, seeded by the step)."""
    corpus = synthetic_corpus(tmp_path / "corpus.txt", dialogues=20)
    options = ["--steps", "8", "--checkpoint-every", "4", *variant]
    assert train(corpus, tmp_path / "straight", *options) == 0

    original = DialogueTask.accumulate_gradients

    def stop_at_step_6(self: DialogueTask, *args: object, **kwargs: object) -> object:
        if args[-1] == 6:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DialogueTask, "accumulate_gradients", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(corpus, tmp_path / "split", *options)
    monkeypatch.setattr(DialogueTask, "accumulate_gradients", original)
    assert train(corpus, tmp_path / "split", *options, "--resume") == 0
    for name in ("training-state.safetensors", "model.safetensors"):
        straight = load_file(tmp_path / "straight" / name)
        split = load_file(tmp_path / "split" / name)
        assert straight.keys() == split.keys()
        for key, tensor in straight.items():
            assert torch.equal(tensor, split[key]), (name, key)
    model = load(tmp_path / "split")
    assert isinstance(model, VMED)
    without_memory = "--no-memory" in variant
    assert model.config.memory_reads == model.config.encoder_reads == (not without_memory)
    assert model.config.usage_decay == (1.0 if without_memory else 0.9)
    assert model.config.read_dropout == (0.0 if without_memory else 0.3)


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
    small[small.index("--batch-size") + 1] = "4"
    code = main(["train", "dialogue", "--corpus", str(corpus), "--out", str(out), *small,
                 "--max-turns", "8", "--steps", "45", "--checkpoint-every", "15",
                 "--log-every", "15"])  # fmt: skip
    assert code == 0
    validations = [r["ce"] for r in json.loads((out / "training.json").read_text())["validations"]]
    assert len(validations) == 3
    uniform = math.log(
        json.loads((out / "config.json").read_text())["hyperparameters"]["vocab_size"]
    )
    assert validations[0] < uniform  # below guessing after 15 steps...
    assert validations[-1] < validations[0] - 0.05  # ...and still falling

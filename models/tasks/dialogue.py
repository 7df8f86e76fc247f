"""Open-domain dialogue on Persona-Chat for the VMED: the corpus, the split, batches, the loss,
validation and the evaluation metrics.

**Corpus.** The Persona-Chat text format: a dialogue starts at a line numbered 1 and its lines
are numbered 1, 2, 3, ...; `your persona:` and `partner's persona:` lines give the personas
(kept by the parser, not used by the model: the model learns from the conversation alone,
which is what a served session has); every other line is one exchange, the partner's utterance
and the reply separated by a tab (a line with one utterance is accepted). The utterances of a
dialogue alternate between the two speakers and the model learns to produce both sides.

**Split.** By dialogue, deterministic: the dialogues are shuffled with `random.Random(seed)`
and the first `round(fraction * n)` (at least one) are held out for validation and evaluation;
the tokenizer is trained on the training dialogues only.

**Examples.** Every utterance of a dialogue is a reply to predict; its context is the (up to)
`context_utterances` utterances before it, each cut to `max_utterance_tokens` tokens and
followed by <eos>, written into a fresh memory in order (empty for a dialogue's first
utterance). Three utterances, about 45 tokens, is what one CPU core trains on in the hour the
default recipe has; a served session writes the whole conversation, so its memory sees more
turns than training ever showed. The reply is decoded from <bos> and must end with <eos>.

**Metrics.** Token cross-entropy (perplexity) with z drawn from the prior, as serving draws it
(fixed noise), and the bound (cross-entropy with z from the posterior + KL) / tokens; on
generated replies (greedy, z from the prior with noise fixed by a seed): corpus BLEU-1 and
BLEU-4 (Papineni et al. 2002, uniform weights, brevity penalty, no smoothing, whitespace
words, one reference) and distinct-1/2 (Li et al. 2016: distinct n-grams over all n-grams of
all replies), all written here.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from models.base import MemoryModel
from models.tokenizer import BOS, EOS, PAD, decode, encode
from models.vmed import VMED

# Seeds the noise of validation (z from the prior); training noise comes from each batch's
# generator, seeded by (seed, step).
VALIDATION_SEED = 1_618_033_988
VALIDATION_BATCH_SIZE = 64
BUCKET_BATCHES = 4  # a training batch is drawn from this many batches' worth of neighbours

YOUR_PERSONA = "your persona:"
PARTNER_PERSONA = "partner's persona:"


@dataclass(frozen=True)
class Dialogue:
    """One dialogue: the two personas and the utterances in the order they were said."""

    your_persona: tuple[str, ...]
    partner_persona: tuple[str, ...]
    utterances: tuple[str, ...]


def parse_dialogues(text: str, source: str = "corpus") -> list[Dialogue]:
    """The dialogues of a corpus in the Persona-Chat text format (see the module docstring).

    Blank lines are skipped, a dialogue without utterances is dropped; a line without its
    number, a number out of sequence or an exchange of more than two utterances is a
    ValueError naming `source` and the line.
    """
    dialogues: list[Dialogue] = []
    current: tuple[list[str], list[str], list[str]] | None = None
    expected = 1

    def finish() -> None:
        if current is not None and current[2]:
            dialogues.append(Dialogue(*(tuple(part) for part in current)))

    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        number_text, _, content = line.partition(" ")
        if not number_text.isdigit():
            raise ValueError(f"{source}:{line_number}: a line must start with its number")
        number = int(number_text)
        if number == 1:
            finish()
            current, expected = ([], [], []), 1
        if current is None or number != expected:
            raise ValueError(
                f"{source}:{line_number}: line number {number}, expected "
                f"{expected if current is not None else 1}"
            )
        expected += 1
        content = content.strip()
        if content.startswith(YOUR_PERSONA):
            current[0].append(content[len(YOUR_PERSONA) :].strip())
            continue
        if content.startswith(PARTNER_PERSONA):
            current[1].append(content[len(PARTNER_PERSONA) :].strip())
            continue
        utterances = [part.strip() for part in content.split("\t") if part.strip()]
        if not utterances or len(utterances) > 2:
            raise ValueError(
                f"{source}:{line_number}: an exchange holds one or two tab-separated "
                f"utterances, got {len(utterances)}"
            )
        current[2].extend(utterances)
    finish()
    return dialogues


def read_corpus(path: str | Path) -> list[Dialogue]:
    """The dialogues of a corpus file; ValueError if it has none."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    dialogues = parse_dialogues(text, str(path))
    if not dialogues:
        raise ValueError(f"{path} holds no dialogue")
    return dialogues


def split_dialogues(
    dialogues: Sequence[Dialogue], validation_fraction: float, seed: int
) -> tuple[list[Dialogue], list[Dialogue]]:
    """(training, validation) dialogues, each in corpus order; see the module docstring."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {validation_fraction}")
    if len(dialogues) < 2:
        raise ValueError(f"a split needs at least 2 dialogues, got {len(dialogues)}")
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    held = min(len(dialogues) - 1, max(1, round(validation_fraction * len(dialogues))))
    validation = set(order[:held])
    train = [d for i, d in enumerate(dialogues) if i not in validation]
    return train, [d for i, d in enumerate(dialogues) if i in validation]


def utterances(dialogues: Iterable[Dialogue]) -> list[str]:
    """Every utterance of the dialogues, in order (what the tokenizer trains on)."""
    return [utterance for dialogue in dialogues for utterance in dialogue.utterances]


@dataclass(frozen=True)
class Example:
    """A reply to predict: the context's token ids (each utterance cut and ended by <eos>,
    concatenated), the reply's token ids (cut, without <eos>) and the reply's text."""

    context: tuple[int, ...]
    reply: tuple[int, ...]
    reply_text: str


def make_examples(
    dialogues: Iterable[Dialogue],
    tokenizer: Tokenizer,
    context_utterances: int,
    max_utterance_tokens: int,
) -> list[Example]:
    """One example per utterance of every dialogue (see the module docstring)."""
    examples = []
    for dialogue in dialogues:
        tokens = [encode(tokenizer, text)[:max_utterance_tokens] for text in dialogue.utterances]
        for index, text in enumerate(dialogue.utterances):
            context: list[int] = []
            for previous in tokens[max(0, index - context_utterances) : index]:
                context.extend([*previous, EOS])
            examples.append(Example(tuple(context), tuple(tokens[index]), text))
    return examples


@dataclass
class DialogueBatch:
    """Padded tensors for a batch of examples: context `[B, Tc]` with its mask, the decoder's
    inputs (<bos>, reply) and targets (reply, <eos>) `[B, Tr]` padded with <pad>, and the
    number of targets of each reply `[B]`."""

    context: Tensor
    context_mask: Tensor
    reply_inputs: Tensor
    reply_targets: Tensor
    reply_lengths: Tensor

    def to(self, device: torch.device | str) -> DialogueBatch:
        tensors = (
            self.context, self.context_mask, self.reply_inputs, self.reply_targets,
            self.reply_lengths,
        )  # fmt: skip
        return DialogueBatch(*(t.to(device) for t in tensors))


def collate(examples: Sequence[Example]) -> DialogueBatch:
    """Pad a list of examples into a batch."""
    batch = len(examples)
    context_length = max(1, max(len(e.context) for e in examples))
    reply_length = max(len(e.reply) for e in examples) + 1
    context = torch.full((batch, context_length), PAD, dtype=torch.int64)
    reply_inputs = torch.full((batch, reply_length), PAD, dtype=torch.int64)
    reply_targets = torch.full((batch, reply_length), PAD, dtype=torch.int64)
    for row, example in enumerate(examples):
        context[row, : len(example.context)] = torch.tensor(example.context, dtype=torch.int64)
        reply = list(example.reply)
        reply_inputs[row, : len(reply) + 1] = torch.tensor([BOS, *reply], dtype=torch.int64)
        reply_targets[row, : len(reply) + 1] = torch.tensor([*reply, EOS], dtype=torch.int64)
    lengths = torch.tensor([len(e.context) for e in examples])
    mask = torch.arange(context_length).unsqueeze(0) < lengths.unsqueeze(1)
    reply_lengths = torch.tensor([len(e.reply) + 1 for e in examples])
    return DialogueBatch(context, mask, reply_inputs, reply_targets, reply_lengths)


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of the targets that are not <pad>."""
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum"
    )


def kl_weight(step: int, warmup_steps: int) -> float:
    """The annealed KL weight: linear from 0 at step 0 to 1 at `warmup_steps`, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def draw_batch(examples: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices of a training batch into examples sorted by context length: a random bucket
    of BUCKET_BATCHES * batch_size neighbours, then batch_size of them at random (with
    replacement). Every example is about equally likely; a batch's contexts are of similar
    lengths, so the encoder runs few padding steps (the longest context sets the loop)."""
    bucket = min(examples, BUCKET_BATCHES * batch_size)
    start = int(torch.randint(examples - bucket + 1, (1,), generator=generator))
    return start + torch.randint(bucket, (batch_size,), generator=generator)


def _as_vmed(model: MemoryModel) -> VMED:
    if not isinstance(model, VMED):
        raise TypeError(f"the dialogue task needs a VMED, got a {model.model_type} model")
    return model


@torch.no_grad()
def validation_scores(
    model: VMED, examples: Sequence[Example], device: torch.device, seed: int = VALIDATION_SEED
) -> dict[str, float]:
    """Per-token cross-entropy with z from the prior (`ce`, fixed noise from `seed`), and the
    bound (cross-entropy with z from the posterior + KL) per token (`nll_bound`)."""
    generator = torch.Generator().manual_seed(seed)
    latent = model.config.latent_size
    noise = torch.randn(len(examples), 2 * latent, generator=generator)
    uniform = torch.rand(len(examples), generator=generator)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].context))
    prior_ce = posterior_ce = kl_sum = tokens = 0.0
    for start in range(0, len(order), VALIDATION_BATCH_SIZE):
        chosen = order[start : start + VALIDATION_BATCH_SIZE]
        batch = collate([examples[i] for i in chosen]).to(device)
        prior_noise = noise[chosen, :latent].to(device)
        logits = model.reply_logits(
            batch.context, batch.context_mask, batch.reply_inputs, prior_noise,
            uniform[chosen].to(device),
        )  # fmt: skip
        prior_ce += float(token_cross_entropy(logits, batch.reply_targets))
        logits, kl = model.training_terms(
            batch.context, batch.context_mask, batch.reply_inputs, batch.reply_targets,
            batch.reply_lengths, noise[chosen, latent : 2 * latent].to(device),
        )  # fmt: skip
        posterior_ce += float(token_cross_entropy(logits, batch.reply_targets))
        kl_sum += float(kl.sum())
        tokens += float(batch.reply_lengths.sum())
    return {"ce": prior_ce / tokens, "nll_bound": (posterior_ce + kl_sum) / tokens}


@dataclass
class DialogueTask:
    """Training batches of dialogue examples and their validation, for `models.training`.

    The fields are the task's settings (recorded in the checkpoint's provenance); the corpus
    is read, split and tokenised with `tokenizer` when the task is made.
    """

    corpus: str
    tokenizer: InitVar[Tokenizer]
    batch_size: int = 32
    context_utterances: int = 3
    max_utterance_tokens: int = 24
    kl_warmup_steps: int = 2000
    validation_fraction: float = 0.1
    split_seed: int = 0
    name: str = "dialogue"

    def __post_init__(self, tokenizer: Tokenizer) -> None:
        for option in ("batch_size", "context_utterances", "max_utterance_tokens"):
            if getattr(self, option) < 1:
                raise ValueError(f"{option.replace('_', ' ')} must be >= 1")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"KL warm-up steps must be >= 0, got {self.kl_warmup_steps}")
        train, validation = split_dialogues(
            read_corpus(self.corpus), self.validation_fraction, self.split_seed
        )
        sizes = (tokenizer, self.context_utterances, self.max_utterance_tokens)
        # Sorted by context length (stable), so that a bucket of neighbours pads little.
        self.train_examples = sorted(make_examples(train, *sizes), key=lambda e: len(e.context))
        self.validation_examples = make_examples(validation, *sizes)

    def loss(
        self, model: MemoryModel, generator: torch.Generator, device: torch.device, step: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """(cross-entropy + w_step * KL) per reply token of a random batch; w anneals."""
        vmed = _as_vmed(model)
        chosen = draw_batch(len(self.train_examples), self.batch_size, generator)
        batch = collate([self.train_examples[i] for i in chosen.tolist()]).to(device)
        noise = torch.randn(self.batch_size, vmed.config.latent_size, generator=generator)
        logits, kl = vmed.training_terms(
            batch.context, batch.context_mask, batch.reply_inputs, batch.reply_targets,
            batch.reply_lengths, noise.to(device),
        )  # fmt: skip
        tokens = batch.reply_lengths.sum()
        ce = token_cross_entropy(logits, batch.reply_targets) / tokens
        weight = kl_weight(step, self.kl_warmup_steps)
        loss = ce + weight * kl.sum() / tokens
        return loss, {"ce": float(ce.detach()), "kl": float(kl.detach().mean())}

    def validate(self, model: MemoryModel, device: torch.device) -> dict[str, float]:
        """`validation_scores` on the held-out dialogues (`ce` decides the best checkpoint)."""
        return validation_scores(_as_vmed(model), self.validation_examples, device)


# --- evaluation: generated replies and their metrics ----------------------------------------


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_order: int
) -> float:
    """Corpus BLEU in [0, 1] with one reference per hypothesis: the geometric mean of the
    clipped n-gram precisions for n = 1..max_order (counts summed over the corpus) times the
    brevity penalty exp(1 - r/c) when the hypotheses' length c is below the references' r.
    0 when some order has no match (no smoothing)."""
    if len(hypotheses) != len(references):
        raise ValueError("BLEU needs one reference per hypothesis")
    matches, totals = [0] * max_order, [0] * max_order
    hypothesis_length = sum(len(h) for h in hypotheses)
    reference_length = sum(len(r) for r in references)
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        for n in range(1, max_order + 1):
            counts, reference_counts = _ngrams(hypothesis, n), _ngrams(reference, n)
            matches[n - 1] += sum(min(c, reference_counts[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(hypothesis) - n + 1)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = (
        1.0
        if hypothesis_length > reference_length
        else math.exp(1 - reference_length / hypothesis_length)
    )
    return brevity * math.exp(log_precision)


def distinct_n(sentences: Sequence[Sequence[str]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sentences (0 when there are none)."""
    grams: Counter[tuple[str, ...]] = Counter()
    for words in sentences:
        grams.update(_ngrams(words, n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


@torch.no_grad()
def generate_replies(
    model: VMED,
    contexts: Sequence[Sequence[int]],
    seed: int,
    max_reply_tokens: int = 32,
    batch_size: int = 128,
) -> list[list[int]]:
    """Greedy replies (token ids, without <eos>) through the serving path: each context is
    encoded into a fresh slot of a pool, `begin_reply` draws z from the prior with noise
    fixed by `seed` (one draw per context, whatever the batch size), then `decode` picks the
    likeliest token until <eos> or `max_reply_tokens`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(contexts), model.config.latent_size, generator=generator)
    uniform = torch.rand(len(contexts), generator=generator)
    device = model.device
    pool = model.new_pool(min(batch_size, max(1, len(contexts))), device)
    replies: list[list[int]] = []
    for first in range(0, len(contexts), batch_size):
        chunk = contexts[first : first + batch_size]
        slots = torch.arange(len(chunk), device=device)
        model.reset(pool, slots.tolist())
        lengths = torch.tensor([len(c) for c in chunk], device=device)
        for t in range(int(lengths.max())):
            tokens = torch.tensor([c[t] if t < len(c) else PAD for c in chunk], device=device)
            model.encode(pool, torch.where(t < lengths, slots, -1), tokens)
        rows = slice(first, first + len(chunk))
        model.begin_reply(pool, slots, noise[rows].to(device), uniform[rows].to(device))
        previous = torch.full((len(chunk),), BOS, dtype=torch.int64, device=device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        chosen: list[list[int]] = [[] for _ in chunk]
        for _ in range(max_reply_tokens):
            logits = model.decode(pool, torch.where(done, -1, slots), previous)
            previous = logits.argmax(dim=-1)
            for row in torch.nonzero(~done & (previous != EOS)).flatten().tolist():
                chosen[row].append(int(previous[row]))
            done |= previous == EOS
            if bool(done.all()):
                break
        replies.extend(chosen)
    return replies


def evaluate_dialogue(
    model: VMED,
    examples: Sequence[Example],
    seed: int,
    max_reply_tokens: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], list[str]]:
    """Perplexities and the metrics of greedy replies on `examples`; also the replies' text."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer")
    scores = validation_scores(model, examples, torch.device(device), seed)
    replies = generate_replies(model, [e.context for e in examples], seed, max_reply_tokens)
    texts = [decode(model.tokenizer, reply) for reply in replies]
    hypotheses = [text.split() for text in texts]
    references = [e.reply_text.split() for e in examples]
    metrics = {
        "examples": float(len(examples)),
        "perplexity": math.exp(scores["ce"]),
        "cross_entropy": scores["ce"],
        "perplexity_bound": math.exp(scores["nll_bound"]),
        "bleu_1": corpus_bleu(hypotheses, references, 1),
        "bleu_4": corpus_bleu(hypotheses, references, 4),
        "distinct_1": distinct_n(hypotheses, 1),
        "distinct_2": distinct_n(hypotheses, 2),
        "mean_reply_words": sum(len(h) for h in hypotheses) / max(1, len(hypotheses)),
    }
    return metrics, texts

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
from models.tokenizer import BOS, EOS, PAD, UNK, decode, encode
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
class Conversation:
    """A dialogue as a session sees it: each utterance's token ids (without <eos>), in the
    order they were said, and its text."""

    utterances: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]


def make_conversations(
    dialogues: Iterable[Dialogue],
    tokenizer: Tokenizer,
    max_utterance_tokens: int = 0,
    max_turns: int = 0,
) -> list[Conversation]:
    """One conversation per dialogue: its first `max_turns` utterances, each cut to
    `max_utterance_tokens` tokens (0: no limit, as serving writes them)."""
    conversations = []
    for dialogue in dialogues:
        texts = dialogue.utterances[:max_turns] if max_turns else dialogue.utterances
        tokens = [encode(tokenizer, text) for text in texts]
        if max_utterance_tokens:
            tokens = [ids[:max_utterance_tokens] for ids in tokens]
        conversations.append(Conversation(tuple(tuple(ids) for ids in tokens), tuple(texts)))
    return conversations


@dataclass
class ConversationBatch:
    """Conversations padded into tensors, longest (most turns) first: `tokens` `[B, T, L]`
    each utterance's ids (<pad> after them), `lengths` `[B, T]` their counts and `present`
    `[B, T]` whether the conversation has that turn (a prefix of the rows at every turn)."""

    tokens: Tensor
    lengths: Tensor
    present: Tensor

    def to(self, device: torch.device | str) -> ConversationBatch:
        return ConversationBatch(
            self.tokens.to(device), self.lengths.to(device), self.present.to(device)
        )


def conversation_order(conversations: Sequence[Conversation]) -> list[int]:
    """Indices of the conversations, most turns first (stable): the order of a batch's rows."""
    return sorted(range(len(conversations)), key=lambda i: -len(conversations[i].utterances))


def collate_conversations(conversations: Sequence[Conversation]) -> ConversationBatch:
    """Pad conversations, already in `conversation_order`, into a batch."""
    turns = [len(c.utterances) for c in conversations]
    if turns != sorted(turns, reverse=True):
        raise ValueError("a batch's conversations must come with the most turns first")
    longest = max(1, *(len(u) for c in conversations for u in c.utterances))
    tokens = torch.full((len(conversations), max(turns), longest), PAD, dtype=torch.int64)
    lengths = torch.zeros(len(conversations), max(turns), dtype=torch.int64)
    for row, conversation in enumerate(conversations):
        for turn, utterance in enumerate(conversation.utterances):
            tokens[row, turn, : len(utterance)] = torch.tensor(utterance, dtype=torch.int64)
            lengths[row, turn] = len(utterance)
    present = torch.arange(max(turns)).unsqueeze(0) < torch.tensor(turns).unsqueeze(1)
    return ConversationBatch(tokens, lengths, present)


@dataclass
class Turn:
    """One turn of a batch, for its first `rows` rows (those that have it): the decoder's
    inputs (<bos>, utterance) and targets (utterance, <eos>) `[rows, L + 1]` padded with
    <pad>, the targets' counts `[rows]`, and the mask of the targets `[rows, L + 1]`, which
    are also what is written into memory after the turn (the utterance, then <eos>)."""

    rows: int
    reply_inputs: Tensor
    reply_targets: Tensor
    reply_lengths: Tensor
    mask: Tensor


def turn_tensors(batch: ConversationBatch, turn: int) -> Turn:
    """The tensors of `turn` (from 0) of a batch."""
    rows = int(batch.present[:, turn].sum())
    lengths = batch.lengths[:rows, turn]
    width = int(lengths.max()) + 1
    tokens = batch.tokens[:rows, turn, : width - 1]
    positions = torch.arange(width, device=tokens.device).unsqueeze(0)
    mask = positions <= lengths.unsqueeze(1)
    targets = torch.cat([tokens, tokens.new_full((rows, 1), PAD)], dim=1)
    targets = torch.where(positions == lengths.unsqueeze(1), EOS, targets)
    inputs = torch.cat([tokens.new_full((rows, 1), BOS), tokens], dim=1)
    return Turn(rows, inputs, targets, lengths + 1, mask)


def _first_rows(state: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    return {name: tensor[:rows] for name, tensor in state.items()}


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of the targets that are not <pad>."""
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum"
    )


def bag_of_words_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed -log p(word) of every target word (not <pad>, not <eos>) under the bag-of-words
    distribution softmax(`logits` `[B, vocab]`) of its row; targets `[B, T]`."""
    log_probabilities = torch.log_softmax(logits, dim=-1).gather(1, targets)
    return -(log_probabilities * ((targets != PAD) & (targets != EOS))).sum()


def kl_weight(step: int, warmup_steps: int) -> float:
    """The annealed KL weight: linear from 0 at step 0 to 1 at `warmup_steps`, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def draw_batch(examples: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices of a training batch into items sorted by size: a random bucket of
    BUCKET_BATCHES * batch_size neighbours, then batch_size of them at random (with
    replacement). Every item is about equally likely; a batch's items are of similar sizes,
    so the loops over turns and tokens run few padding steps."""
    bucket = min(examples, BUCKET_BATCHES * batch_size)
    start = int(torch.randint(examples - bucket + 1, (1,), generator=generator))
    return start + torch.randint(bucket, (batch_size,), generator=generator)


def _as_vmed(model: MemoryModel) -> VMED:
    if not isinstance(model, VMED):
        raise TypeError(f"the dialogue task needs a VMED, got a {model.model_type} model")
    return model


@dataclass
class TurnScores:
    """Sums over the replies of each turn index (from 0): cross-entropy with z from the prior
    (`prior_ce`), with z from the posterior (`posterior_ce`), the KL bound, and the number of
    target tokens and of replies."""

    prior_ce: list[float]
    posterior_ce: list[float]
    kl: list[float]
    tokens: list[float]
    replies: list[float]

    def add(self, turn: int, **values: float) -> None:
        for name, value in values.items():
            column: list[float] = getattr(self, name)
            column.extend([0.0] * (turn + 1 - len(column)))
            column[turn] += value

    def total(self, name: str, turns: slice = slice(None)) -> float:
        column: list[float] = getattr(self, name)
        return sum(column[turns])


@torch.no_grad()
def conversation_scores(
    model: VMED,
    conversations: Sequence[Conversation],
    device: torch.device,
    seed: int = VALIDATION_SEED,
    batch_size: int = VALIDATION_BATCH_SIZE,
) -> TurnScores:
    """Every utterance of every conversation scored as a reply, each conversation written
    into its memory turn by turn as serving writes it (the utterance, then <eos>): the
    teacher-forced cross-entropy with z from the prior (noise fixed by `seed`, one draw per
    conversation and turn, whatever the batches) and the posterior's bound, by turn."""
    scores = TurnScores([], [], [], [], [])
    if not conversations:
        return scores
    latent = model.config.latent_size
    most = max(len(c.utterances) for c in conversations)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(conversations), most, 2 * latent, generator=generator)
    uniform = torch.rand(len(conversations), most, generator=generator)
    order = conversation_order(conversations)
    for first in range(0, len(order), batch_size):
        chosen = order[first : first + batch_size]
        batch = collate_conversations([conversations[i] for i in chosen]).to(device)
        state = model.initial_batch_state(len(chosen))
        for turn in range(batch.tokens.shape[1]):
            t = turn_tensors(batch, turn)
            state = _first_rows(state, t.rows)
            rows = chosen[: t.rows]
            prior_noise = noise[rows, turn, :latent].to(device)
            logits = model.prior_reply_logits(
                state, t.reply_inputs, prior_noise, uniform[rows, turn].to(device)
            )
            prior_ce = float(token_cross_entropy(logits, t.reply_targets))
            posterior_noise = noise[rows, turn, latent:].to(device)
            logits, kl, _ = model.reply_terms(
                state, t.reply_inputs, t.reply_targets, t.reply_lengths, posterior_noise
            )
            scores.add(
                turn,
                prior_ce=prior_ce,
                posterior_ce=float(token_cross_entropy(logits, t.reply_targets)),
                kl=float(kl.sum()),
                tokens=float(t.reply_lengths.sum()),
                replies=float(t.rows),
            )
            state = model.encode_tokens(state, t.reply_targets, t.mask)
    return scores


@dataclass
class DialogueTask:
    """Training batches of whole conversations and their validation, for `models.training`.

    The fields are the task's settings (recorded in the checkpoint's provenance); the corpora
    are read, split and tokenised with `tokenizer` when the task is made. Training draws
    conversations of `corpus`'s training split and of every conversation of `extra_corpus`
    (if any), each of `corpus`'s `corpus_repeat` times (to weigh it against a larger extra
    corpus); validation uses `corpus`'s held-out dialogues only.
    """

    corpus: str
    tokenizer: InitVar[Tokenizer]
    extra_corpus: str = ""
    corpus_repeat: int = 1
    batch_size: int = 16
    max_utterance_tokens: int = 32
    max_turns: int = 32
    bptt_turns: int = 8
    kl_warmup_steps: int = 2000
    free_bits: float = 0.0
    bag_of_words_weight: float = 0.0
    word_dropout: float = 0.0
    validation_fraction: float = 0.1
    split_seed: int = 0
    name: str = "dialogue"

    def __post_init__(self, tokenizer: Tokenizer) -> None:
        for option in ("batch_size", "max_utterance_tokens", "max_turns", "corpus_repeat"):
            if getattr(self, option) < 1:
                raise ValueError(f"{option.replace('_', ' ')} must be >= 1")
        for option in ("bptt_turns", "kl_warmup_steps", "free_bits", "bag_of_words_weight"):
            if getattr(self, option) < 0:
                raise ValueError(f"{option.replace('_', ' ')} must be >= 0")
        if not 0 <= self.word_dropout < 1:
            raise ValueError(f"word dropout must be in [0, 1), got {self.word_dropout}")
        train, validation = split_dialogues(
            read_corpus(self.corpus), self.validation_fraction, self.split_seed
        )
        train = train * self.corpus_repeat
        if self.extra_corpus:
            train += read_corpus(self.extra_corpus)
        conversations = make_conversations(
            train, tokenizer, self.max_utterance_tokens, self.max_turns
        )
        # Sorted by turns, then tokens, so that a bucket of neighbours pads little.
        self.train_conversations = sorted(
            conversations, key=lambda c: (len(c.utterances), sum(map(len, c.utterances)))
        )
        self.validation_conversations = make_conversations(validation, tokenizer)

    def accumulate_gradients(
        self, model: MemoryModel, generator: torch.Generator, device: torch.device, step: int
    ) -> tuple[float, dict[str, float]]:
        """Draw a batch of conversations and put the gradient of its loss per reply token into
        the parameters' `.grad`: every utterance is a reply, decoded with z from the
        posterior from the state in which the conversation so far was written into memory;
        the loss is its cross-entropy + w_step * KL (each reply's KL at least `free_bits`
        nats, so that below it z is free) + `bag_of_words_weight` * the bag-of-words loss.
        Backpropagation is truncated every `bptt_turns` turns (0: never): the gradient of
        those turns is taken and the memory's state detached, which bounds the graph kept.
        Returns the loss and metrics."""
        vmed = _as_vmed(model)
        chosen = draw_batch(len(self.train_conversations), self.batch_size, generator).tolist()
        conversations = [self.train_conversations[i] for i in chosen]
        conversations = [conversations[i] for i in conversation_order(conversations)]
        batch = collate_conversations(conversations).to(device)
        rows, turns, longest = batch.tokens.shape
        noise = torch.randn(rows, turns, vmed.config.latent_size, generator=generator)
        dropped = torch.rand(rows, turns, longest + 1, generator=generator) < self.word_dropout
        if vmed.config.read_dropout == 0:
            return self.backward(vmed, batch, noise.to(device), dropped.to(device), step)
        # The read dropout's masks come from the default generator of the device the batch
        # runs on: seeded from this batch's, so that they too are a function of (seed, step)
        # and a resumed run repeats them; forked, so that nothing else's draws move. (On a
        # GPU the masks differ from the CPU's: a run resumes on the kind it started on.)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            return self.backward(vmed, batch, noise.to(device), dropped.to(device), step)

    def backward(
        self, vmed: VMED, batch: ConversationBatch, noise: Tensor, dropped: Tensor, step: int
    ) -> tuple[float, dict[str, float]]:
        """`accumulate_gradients` on a given batch: the posterior's `noise`
        `[B, T, latent]` and the decoder inputs replaced by <unk> (`dropped` `[B, T, L + 1]`,
        where L is the batch's longest utterance; <bos> and <pad> are never replaced)."""
        rows, turns, _ = batch.tokens.shape
        tokens = float((batch.lengths + 1)[batch.present].sum())
        weight = kl_weight(step, self.kl_warmup_steps)
        state = vmed.initial_batch_state(rows)
        pending: Tensor | None = None
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "bow": 0.0}
        replies = 0
        for turn in range(turns):
            t = turn_tensors(batch, turn)
            state = _first_rows(state, t.rows)
            inputs = t.reply_inputs
            if self.word_dropout > 0:
                drop = dropped[: t.rows, turn, : inputs.shape[1]] & (inputs != PAD)
                inputs = torch.where(drop & (inputs != BOS), UNK, inputs)
            logits, kl, z = vmed.reply_terms(
                state, inputs, t.reply_targets, t.reply_lengths, noise[: t.rows, turn]
            )
            ce = token_cross_entropy(logits, t.reply_targets)
            penalty = kl.clamp(min=self.free_bits) if self.free_bits > 0 else kl
            loss = ce + weight * penalty.sum()
            if self.bag_of_words_weight > 0:
                bow = bag_of_words_loss(vmed.bag_of_words_logits(state, z), t.reply_targets)
                loss = loss + self.bag_of_words_weight * bow
                totals["bow"] += float(bow.detach())
            loss = loss / tokens
            pending = loss if pending is None else pending + loss
            totals["loss"] += float(loss.detach())
            totals["ce"] += float(ce.detach())
            totals["kl"] += float(kl.detach().sum())
            replies += t.rows
            last = turn == turns - 1
            if not last:
                state = vmed.encode_tokens(state, t.reply_targets, t.mask)
            if last or (self.bptt_turns and (turn + 1) % self.bptt_turns == 0):
                torch.autograd.backward(pending)
                pending = None
                state = {name: tensor.detach() for name, tensor in state.items()}
        metrics = {
            "ce": totals["ce"] / tokens,
            "kl_per_reply": totals["kl"] / replies,
            "kl_per_token": totals["kl"] / tokens,
        }
        if self.bag_of_words_weight > 0:
            metrics["bow"] = totals["bow"] / tokens
        return totals["loss"], metrics

    def validate(self, model: MemoryModel, device: torch.device) -> dict[str, float]:
        """On the held-out conversations, whole, written into memory turn by turn: the
        cross-entropy per token with z from the prior (`ce`, which decides the best
        checkpoint) and the bound (posterior cross-entropy + KL) per token (`nll_bound`)."""
        scores = conversation_scores(_as_vmed(model), self.validation_conversations, device)
        tokens = scores.total("tokens")
        return {
            "ce": scores.total("prior_ce") / tokens,
            "nll_bound": (scores.total("posterior_ce") + scores.total("kl")) / tokens,
        }


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
def generate_conversation_replies(
    model: VMED,
    conversations: Sequence[Conversation],
    seed: int,
    max_reply_tokens: int = 32,
    batch_size: int = 128,
    presence_penalty: float = 0.0,
) -> list[list[list[int]]]:
    """Greedy replies (token ids, without <eos>) at every turn of every conversation, through
    the serving path: each conversation has a slot of a pool; at each turn `begin_reply`
    draws z from the prior (noise fixed by `seed`, one draw per conversation and turn), then
    `decode` picks the likeliest token (its logit less `presence_penalty` if the model has
    said it before in the conversation) until <eos> or `max_reply_tokens`; then the turn's
    real utterance and <eos> are written into memory (`encode`), as serving writes a turn,
    so every reply is generated from the conversation as it really went."""
    replies: list[list[list[int]]] = [[] for _ in conversations]
    if not conversations:
        return replies
    most = max(len(c.utterances) for c in conversations)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(conversations), most, model.config.latent_size, generator=generator)
    uniform = torch.rand(len(conversations), most, generator=generator)
    device = model.device
    pool = model.new_pool(min(batch_size, len(conversations)), device)
    penalty = torch.full((pool.capacity,), float(presence_penalty), device=device)
    for first in range(0, len(conversations), batch_size):
        chunk = list(range(first, min(first + batch_size, len(conversations))))
        slots = torch.arange(len(chunk), device=device)
        model.reset(pool, slots.tolist())
        turns = torch.tensor([len(conversations[i].utterances) for i in chunk], device=device)
        for turn in range(int(turns.max())):
            live = torch.where(turn < turns, slots, -1)
            model.begin_reply(
                pool, live, noise[chunk, turn].to(device), uniform[chunk, turn].to(device)
            )
            previous = torch.full((len(chunk),), BOS, dtype=torch.int64, device=device)
            done = live < 0
            chosen: list[list[int]] = [[] for _ in chunk]
            for _ in range(max_reply_tokens):
                if bool(done.all()):
                    break
                logits = model.decode(
                    pool, torch.where(done, -1, slots), previous, penalty[: len(chunk)]
                )
                previous = logits.argmax(dim=-1)
                for row in torch.nonzero(~done & (previous != EOS)).flatten().tolist():
                    chosen[row].append(int(previous[row]))
                done |= previous == EOS
            said = [
                [*conversations[i].utterances[turn], EOS] if turn < len(conversations[i].utterances)
                else []
                for i in chunk
            ]  # fmt: skip
            for position in range(max(len(s) for s in said)):
                writing = torch.tensor([position < len(s) for s in said], device=device)
                tokens = torch.tensor(
                    [s[position] if position < len(s) else PAD for s in said], device=device
                )
                model.encode(pool, torch.where(writing, slots, -1), tokens)
            for row, index in enumerate(chunk):
                if turn < len(conversations[index].utterances):
                    replies[index].append(chosen[row])
    return replies


TURN_BUCKETS = 7  # perplexity by turn: 1, 2, ..., 6, and 7 and later together


def turn_bucket_label(bucket: int) -> str:
    """'1', '2', ..., '7+' for buckets 0..TURN_BUCKETS - 1."""
    return f"{bucket + 1}+" if bucket == TURN_BUCKETS - 1 else str(bucket + 1)


def utterance_turns(bucket: int) -> slice:
    """The utterance indices (from 0) of a turn bucket: turn k is the k-th exchange, the
    partner's utterance and the reply (utterances 2k - 2 and 2k - 1), as one Generate call
    is a turn in serving; the last bucket holds every later turn too."""
    return slice(2 * bucket, None if bucket == TURN_BUCKETS - 1 else 2 * bucket + 2)


def perplexities(scores: TurnScores) -> dict[str, float]:
    """The perplexities of `conversation_scores`: overall, by turn as `utterance_turns` defines
    it and by utterance index (with z from the prior), the bound (posterior cross-entropy +
    KL) and the KL per token and per reply; also the counts of replies and tokens."""
    tokens = scores.total("tokens")
    metrics: dict[str, float] = {
        "replies": scores.total("replies"),
        "tokens": tokens,
        "perplexity": math.exp(scores.total("prior_ce") / tokens),
        "cross_entropy": scores.total("prior_ce") / tokens,
        "perplexity_bound": math.exp((scores.total("posterior_ce") + scores.total("kl")) / tokens),
        "kl_per_token": scores.total("kl") / tokens,
        "kl_per_reply": scores.total("kl") / scores.total("replies"),
    }
    for bucket in range(TURN_BUCKETS):
        turns = utterance_turns(bucket)
        count = scores.total("tokens", turns)
        label = turn_bucket_label(bucket)
        metrics[f"perplexity_turn_{label}"] = (
            math.exp(scores.total("prior_ce", turns) / count) if count else math.nan
        )
        metrics[f"replies_turn_{label}"] = scores.total("replies", turns)
    for index, (ce, count) in enumerate(zip(scores.prior_ce, scores.tokens, strict=True)):
        metrics[f"perplexity_utterance_{index + 1}"] = math.exp(ce / count)
    return metrics


def evaluate_dialogue(
    model: VMED,
    conversations: Sequence[Conversation],
    seed: int,
    max_reply_tokens: int = 32,
    device: torch.device | str = "cpu",
    presence_penalty: float = 0.0,
) -> tuple[dict[str, float], list[list[str]]]:
    """Perplexities (overall, by turn as `utterance_turns` defines it, and by utterance
    index) and the metrics of greedy replies at every utterance of `conversations`, each
    written into memory as it went; also the replies' text. Whether z
    changes replies: the fraction of greedy replies that differ when z's noise comes from
    seed + 1 instead of seed."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer")
    tokenizer = model.tokenizer
    scores = conversation_scores(model, conversations, torch.device(device), seed)
    metrics = {"conversations": float(len(conversations)), **perplexities(scores)}
    generated = generate_conversation_replies(
        model, conversations, seed, max_reply_tokens, presence_penalty=presence_penalty
    )
    texts = [[decode(tokenizer, reply) for reply in replies] for replies in generated]
    hypotheses = [text.split() for replies in texts for text in replies]
    references = [text.split() for c in conversations for text in c.texts]
    again = generate_conversation_replies(
        model, conversations, seed + 1, max_reply_tokens, presence_penalty=presence_penalty
    )
    flat, flat_again = (
        [reply for replies in generated for reply in replies],
        [reply for replies in again for reply in replies],
    )
    metrics.update(
        bleu_1=corpus_bleu(hypotheses, references, 1),
        bleu_4=corpus_bleu(hypotheses, references, 4),
        distinct_1=distinct_n(hypotheses, 1),
        distinct_2=distinct_n(hypotheses, 2),
        mean_reply_words=sum(len(h) for h in hypotheses) / max(1, len(hypotheses)),
        replies_changed_by_z=sum(a != b for a, b in zip(flat, flat_again, strict=True))
        / max(1, len(flat)),
    )
    return metrics, texts

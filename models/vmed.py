"""The Variational Memory Encoder-Decoder (Le, Tran, Nguyen and Venkatesh, NeurIPS 2018).

A dialogue model whose conversation lives in a DNC memory of fixed size:

- **Encoder.** An LSTM controller with a DNC memory (`models.dnc`'s functions: the reference
  step with autograd for training, `kernels.dnc_memory_step` in place on the pool for serving)
  reads every utterance token by token, [embedding(x_t); reads_{t-1}] -> controller -> DNC
  interface -> write and read, and so writes the conversation into the session's memory: the
  partner's utterances and the model's own replies, each followed by <eos>.
- **Prior.** A reply starts from the encoder's controller state h_0, c_0. K read heads with
  keys and strengths from h_0 read the memory by content (no writes while replying). The prior
  over the latent z is a mixture of K Gaussians: component k's mean and log-variance come from
  an MLP over head k's read vector, and the mixture weights are pi = softmax_k(beta_k), the
  softmax over the heads of their key strengths beta_k = oneplus(.) >= 1. A head that found
  a sharp match in memory raises its strength to sharpen its weighting, and so also the weight
  of the component built from what it read. z is drawn from the prior once, at the start.
- **Decoder.** An LSTM from h_0, c_0 reads [embedding(y_{t-1}); z; reads_{t-1}], reads the
  memory with the K heads from its new h_t (content-based), and maps [h_t; reads_t] to the
  logits of y_t.
- **Training.** A posterior network q(z | reads_0, h_0, reply): an LSTM over the reply's
  tokens, its last hidden state with the prior's reads and h_0 through an MLP to a diagonal
  Gaussian; z = mu + sigma * eps (reparameterised). The loss is the reconstruction
  cross-entropy plus a weighted KL(q || prior). KL against a mixture has no closed form; we
  use the upper bound KL(q || sum_k pi_k p_k) <= sum_k pi_k KL(q || p_k) (KL is convex in
  its second argument), each term in closed form, so the loss bounds the negative ELBO from
  above. The task anneals the KL weight linearly from 0 to 1.
- **Ablations.** `memory_reads=False` cuts the decoder off the memory: its reads are zeros and
  the prior is a single Gaussian from an MLP over the encoder's top hidden state (a CVAE).
  The parameter shapes are those of the full model but for the prior MLP's input width.
  `encoder_reads=False` gives the encoder zeros for its reads; with both off nothing reads
  the memory, so nothing is written either (the memory step is skipped): the same network
  as an LSTM encoder-decoder whose only record of the conversation is the encoder's state.
- **Bag of words** (`bag_of_words=True`, Zhao, Zhao and Eskenazi 2017): a training-only head
  predicts the reply's words, unordered, from [h_0; z], so that z must carry the reply's
  content; serving never uses it.

Serving (`encode`, `begin_reply`, `decode`, all batched over `slots: int64[B]` of a
`StatePool`, in place, -1 = padding row: nothing read or written, zeros returned) keeps the
whole session in fixed-size tensors, whatever the conversation's length. Randomness is the
caller's: `begin_reply` takes the standard-normal `noise [B, latent]` and a `uniform [B]` in
[0, 1) and picks component k = the number of cumulative mixture weights pi_1, pi_1 + pi_2, ...
that are <= uniform (clamped to K-1), then z = mu_k + exp(log_var_k / 2) * noise.

**What the model has said** (`said`, bool `[vocab]`): every token a session's decoder was
given as its previous token since the session began (`decode`'s ids; for `step`, the token
whose input row is at least 0.5, a one-hot row's; never <bos>), so over every reply of the
conversation, in a fixed size like the rest (one byte a token of the vocabulary). The
conversation's presence penalty reads it: `decode(..., presence_penalty=p)` returns the
logits less p on each token the model has said (the `presence_penalty` of OpenAI's API, over
the whole conversation rather than one reply). The record is kept whatever the penalty, and
the state after a `decode` still depends on the previous token only.

`MemoryModel`'s generic API views the VMED as a language model over one-hot tokens:
`input_size == output_size == vocab_size`; `step` is one `decode` step whose previous token
is given as a one-hot (or any distribution) row, returning next-token probabilities, and
`forward` is `step` from a new session (empty memory, z = 0) over whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from kernels.launch import validate_slots
from kernels.reference import content_addressing
from models.activations import oneplus
from models.base import MemoryModel, on_live_rows, require_positive
from models.controller import LSTMController, rowwise_linear, rowwise_product
from models.dnc import (
    dnc_memory_specs,
    dnc_pool_step,
    dnc_state_step,
    interface_split_sizes,
    split_interface,
)
from models.state import StatePool, StateSpec
from models.tokenizer import BOS, TOKENIZER_FILE, tokenizer_from_bytes, tokenizer_to_bytes

LOG_VARIANCE_LIMIT = 10.0  # |log sigma^2| of every Gaussian, so exp() stays finite


@dataclass(frozen=True)
class VMEDConfig:
    """Every hyperparameter of a VMED; `config.json` stores exactly these fields."""

    vocab_size: int
    embedding_size: int = 64
    controller_size: int = 128  # encoder, decoder and posterior LSTMs
    controller_layers: int = 1
    memory_rows: int = 64  # N
    word_size: int = 32  # W
    read_heads: int = 2  # R, the encoder's DNC read heads
    mixture_components: int = 4  # K, the decoder's read heads and the prior's components
    latent_size: int = 32
    mlp_size: int = 64  # hidden width of the prior and posterior MLPs
    use_links: bool = False  # the encoder DNC's temporal links (N x N state per session)
    memory_reads: bool = True  # False: the CVAE ablation (no decoder reads, Gaussian prior)
    memory_init: float = 1e-6
    encoder_reads: bool = True  # False: the encoder's reads are zeros
    bag_of_words: bool = False  # a training-only head: the reply's words from [h_0; z]
    # Every encoder step first multiplies the memory's usage by this (1: the DNC as published),
    # so that rows written long ago, and not written since, become the least used: a full
    # memory then allocates them first instead of writing weakly everywhere.
    usage_decay: float = 1.0
    # Training only: the probability that each element of a memory read vector (the encoder's
    # R reads and the decoder's K) is zeroed, the rest scaled by 1 / (1 - p). A regulariser
    # for a network that fits its training conversations through the memory; serving (eval
    # mode) reads whole.
    read_dropout: float = 0.0

    @property
    def uses_memory(self) -> bool:
        """Whether anything reads the memory (else the memory step is skipped)."""
        return self.memory_reads or self.encoder_reads

    def __post_init__(self) -> None:
        require_positive(
            self, "vocab_size", "embedding_size", "controller_size", "controller_layers",
            "memory_rows", "word_size", "read_heads", "mixture_components", "latent_size",
            "mlp_size",
        )  # fmt: skip
        if not 0 < self.usage_decay <= 1:
            raise ValueError(f"VMED usage_decay must be in (0, 1], got {self.usage_decay}")
        if not 0 <= self.read_dropout < 1:
            raise ValueError(f"VMED read_dropout must be in [0, 1), got {self.read_dropout}")


class ReplyStart(NamedTuple):
    """What the start of a reply computes from the encoder's state, for a batch.

    `reads` `[B, K, W]` (zeros without memory reads); `log_weights` `[B, C]`, `means` and
    `log_variances` `[B, C, latent]` the prior's C components (C = K, or 1 without memory
    reads).
    """

    reads: Tensor
    log_weights: Tensor
    means: Tensor
    log_variances: Tensor


def gaussian_kl(mean_q: Tensor, log_var_q: Tensor, mean_p: Tensor, log_var_p: Tensor) -> Tensor:
    """KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))) of diagonal Gaussians,
    summed over the last dimension."""
    ratio = torch.exp(log_var_q - log_var_p)
    squared = (mean_q - mean_p).pow(2) * torch.exp(-log_var_p)
    return 0.5 * (log_var_p - log_var_q + ratio + squared - 1).sum(dim=-1)


def mixture_kl_bound(
    mean_q: Tensor, log_var_q: Tensor, prior_log_weights: Tensor, means: Tensor, log_vars: Tensor
) -> Tensor:
    """sum_k pi_k KL(q || p_k) >= KL(q || sum_k pi_k p_k): q `[B, Z]`, components
    `[B, C, Z]`, log weights `[B, C]` -> `[B]`."""
    per_component = gaussian_kl(mean_q.unsqueeze(1), log_var_q.unsqueeze(1), means, log_vars)
    return (prior_log_weights.exp() * per_component).sum(dim=-1)


def sample_prior(start: ReplyStart, noise: Tensor, uniform: Tensor) -> Tensor:
    """z `[B, Z]` from the mixture prior with the caller's randomness (the module docstring
    gives the convention): noise `[B, Z]` standard normal, uniform `[B]` in [0, 1)."""
    cumulative = start.log_weights.exp().cumsum(dim=-1)
    components = start.log_weights.shape[-1]
    chosen = (cumulative <= uniform.unsqueeze(-1)).sum(dim=-1).clamp(max=components - 1)
    index = chosen.view(-1, 1, 1).expand(-1, 1, start.means.shape[-1])
    mean = start.means.gather(1, index).squeeze(1)
    log_var = start.log_variances.gather(1, index).squeeze(1)
    return mean + torch.exp(0.5 * log_var) * noise


def _linear(inputs: Tensor, layer: nn.Linear, rowwise: bool) -> Tensor:
    """`layer(inputs)` over the last dimension; row-wise (batch-independent) for serving."""
    if not rowwise:
        result: Tensor = layer(inputs)
        return result
    flat = inputs.reshape(-1, inputs.shape[-1])
    return rowwise_linear(flat, layer).view(*inputs.shape[:-1], layer.out_features)


class GaussianMLP(nn.Module):
    """inputs -> Linear -> tanh -> Linear -> (mean, log-variance) of a diagonal Gaussian."""

    def __init__(self, input_size: int, hidden_size: int, latent_size: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, 2 * latent_size)

    def forward(self, inputs: Tensor, rowwise: bool = False) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(_linear(inputs, self.hidden, rowwise))
        mean, log_var = _linear(hidden, self.out, rowwise).chunk(2, dim=-1)
        return mean, log_var.clamp(-LOG_VARIANCE_LIMIT, LOG_VARIANCE_LIMIT)


class VMED(MemoryModel):
    """A VMED whose teacher-forced passes train with autograd and whose `encode`,
    `begin_reply` and `decode` serve sessions from a state pool (see the module docstring)."""

    model_type: ClassVar[str] = "vmed"
    extra_file_names: ClassVar[tuple[str, ...]] = (TOKENIZER_FILE,)
    config: VMEDConfig
    initial_memory: Tensor  # a buffer, saved with the weights

    def __init__(self, config: VMEDConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        H, L, W, R, K = (
            c.controller_size, c.controller_layers, c.word_size, c.read_heads,
            c.mixture_components,
        )  # fmt: skip
        self.embedding = nn.Embedding(c.vocab_size, c.embedding_size)
        self.encoder = LSTMController(c.embedding_size + R * W, H, L)
        self.encoder_interface = nn.Linear(H, sum(interface_split_sizes(R, W, c.use_links)))
        self.initial_reads = nn.Parameter(torch.zeros(R, W))
        self.initial_h = nn.Parameter(torch.zeros(L, H))
        self.initial_c = nn.Parameter(torch.zeros(L, H))
        self.register_buffer("initial_memory", torch.full((c.memory_rows, W), c.memory_init))
        self.decoder = LSTMController(c.embedding_size + c.latent_size + K * W, H, L)
        self.read_interface = nn.Linear(H, K * W + K)  # the decoder's read keys and strengths
        self.prior = GaussianMLP(W if c.memory_reads else H, c.mlp_size, c.latent_size)
        self.reply_reader = nn.LSTM(c.embedding_size, H, batch_first=True)
        self.posterior = GaussianMLP(2 * H + K * W, c.mlp_size, c.latent_size)
        self.output = nn.Linear(H + K * W, c.vocab_size)
        self.bag_of_words = nn.Linear(H + c.latent_size, c.vocab_size) if c.bag_of_words else None
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.load_extra_file(TOKENIZER_FILE, tokenizer_to_bytes(tokenizer))

    # --- MemoryModel: sizes, state, checkpoint files ---------------------------------------

    @property
    def input_size(self) -> int:
        return self.config.vocab_size

    @property
    def output_size(self) -> int:
        return self.config.vocab_size

    def state_specs(self) -> tuple[StateSpec, ...]:
        c = self.config
        H, L, W = c.controller_size, c.controller_layers, c.word_size
        return (
            *dnc_memory_specs(c.memory_rows, W, c.read_heads, c.use_links),
            StateSpec("encoder_reads", (c.read_heads, W)),
            StateSpec("encoder_h", (L, H)),
            StateSpec("encoder_c", (L, H)),
            StateSpec("decoder_reads", (c.mixture_components, W)),
            StateSpec("decoder_h", (L, H)),
            StateSpec("decoder_c", (L, H)),
            StateSpec("z", (c.latent_size,)),
            StateSpec("said", (c.vocab_size,), torch.bool, zero_if_missing=True),  # added later
        )

    def initial_state(self) -> dict[str, Tensor]:
        """Empty memory (the constant `memory_init`, zero weightings), the learned encoder
        reads and controller state; the decoder starts from that state with zero reads and
        z = 0 (what `decode` uses if called before any `begin_reply`)."""
        state = {
            spec.name: self.initial_memory.new_zeros(spec.shape, dtype=spec.dtype)
            for spec in self.state_specs()
        }
        learned = {
            "memory": self.initial_memory,
            "encoder_reads": self.initial_reads,
            "encoder_h": self.initial_h,
            "encoder_c": self.initial_c,
            "decoder_h": self.initial_h,
            "decoder_c": self.initial_c,
        }
        state.update(learned)
        return {name: tensor.detach().clone() for name, tensor in state.items()}

    def extra_files(self) -> dict[str, bytes]:
        if self.tokenizer is None:
            raise ValueError("this VMED has no tokenizer: a checkpoint needs its tokenizer.json")
        return {TOKENIZER_FILE: tokenizer_to_bytes(self.tokenizer)}

    def load_extra_file(self, name: str, data: bytes) -> None:
        if name != TOKENIZER_FILE:
            super().load_extra_file(name, data)
        self.tokenizer = tokenizer_from_bytes(data, self.config.vocab_size)

    # --- the equations, shared by training (batched tensors) and serving (pool rows) -------

    def _encoder_step(
        self, tokens: Tensor, reads: Tensor, h: Tensor, c: Tensor, rowwise: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The controller part of one encoder step: new h, c and the DNC interface vector."""
        if not self.config.encoder_reads:
            reads = torch.zeros_like(reads)
        reads = self._dropped(reads)
        inputs = torch.cat([self.embedding(tokens), reads.flatten(1)], dim=1)
        if rowwise:
            h, c = self.encoder.step(inputs, h, c)
        else:
            h, c = self.encoder(inputs, h, c)
        return h, c, _linear(h[:, -1], self.encoder_interface, rowwise)

    def _read_memory(self, h_top: Tensor, memory: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
        """The decoder's K content reads from `memory` `[B, N, W]` with keys and strengths
        from `h_top`: reads `[B, K, W]` and the strengths `[B, K]`."""
        K, W = self.config.mixture_components, self.config.word_size
        interface = _linear(h_top, self.read_interface, rowwise)
        keys = interface[:, : K * W].reshape(-1, K, W)
        strengths = oneplus(interface[:, K * W :])
        weights = content_addressing(keys, memory, strengths)
        return self._dropped(weights @ memory), strengths

    def _dropped(self, reads: Tensor) -> Tensor:
        """`reads` with `config.read_dropout` applied in training; unchanged otherwise."""
        if self.training and self.config.read_dropout > 0:
            return nn.functional.dropout(reads, self.config.read_dropout)
        return reads

    def _start_reply(self, h: Tensor, memory: Tensor, rowwise: bool) -> ReplyStart:
        """The prior and the first reads, from the encoder's h `[B, L, H]` and the memory."""
        if self.config.memory_reads:
            reads, strengths = self._read_memory(h[:, -1], memory, rowwise)
            means, log_vars = self.prior(reads, rowwise)
            return ReplyStart(reads, torch.log_softmax(strengths, dim=-1), means, log_vars)
        batch, K, W = h.shape[0], self.config.mixture_components, self.config.word_size
        means, log_vars = self.prior(h[:, -1:], rowwise)  # one component
        reads = h.new_zeros(batch, K, W)
        return ReplyStart(reads, h.new_zeros(batch, 1), means, log_vars)

    def _decoder_step(
        self,
        embedded: Tensor,
        z: Tensor,
        reads: Tensor,
        h: Tensor,
        c: Tensor,
        memory: Tensor,
        rowwise: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoder step: logits `[B, vocab]` and the new reads, h and c."""
        inputs = torch.cat([embedded, z, reads.flatten(1)], dim=1)
        if rowwise:
            h, c = self.decoder.step(inputs, h, c)
        else:
            h, c = self.decoder(inputs, h, c)
        if self.config.memory_reads:
            reads, _ = self._read_memory(h[:, -1], memory, rowwise)
        features = torch.cat([h[:, -1], reads.flatten(1)], dim=1)
        return _linear(features, self.output, rowwise), reads, h, c

    # --- training: whole batches with autograd --------------------------------------------

    def encode_context(self, context: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The state after writing `context` `[B, T]` (int64) into fresh memories; `mask`
        `[B, T]` (bool) marks real tokens: a masked step changes nothing, so contexts of
        different lengths share a batch. Returns every state tensor but the decoder's."""
        return self.encode_tokens(self.initial_batch_state(context.shape[0]), context, mask)

    def initial_batch_state(self, batch: int) -> dict[str, Tensor]:
        """`initial_state_tensors` expanded to a batch of `batch` new sessions."""
        return {
            name: tensor.expand(batch, *tensor.shape)
            for name, tensor in self.initial_state_tensors().items()
        }

    def encode_tokens(
        self, state: dict[str, Tensor], tokens: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        """Write `tokens` `[B, T]` into the memories of a batch's `state` (the encoder's part,
        as `encode_context` returns it), one step per token as `encode` does; `mask` `[B, T]`
        marks real tokens (a masked step changes nothing). Returns the new state."""
        c = self.config
        for t in range(tokens.shape[1]):
            live = mask[:, t]
            if not bool(live.any()):
                continue
            h, cell, interface = self._encoder_step(
                tokens[:, t], state["encoder_reads"], state["encoder_h"], state["encoder_c"],
                rowwise=False,
            )  # fmt: skip
            new = {**state, "encoder_h": h, "encoder_c": cell}
            if c.uses_memory:
                memory = {name: state[name] for name in self._memory_names()}
                if c.usage_decay != 1:
                    memory["usage"] = memory["usage"] * c.usage_decay
                parameters = split_interface(interface, c.read_heads, c.word_size, c.use_links)
                memory, reads = dnc_state_step(memory, parameters)
                new.update(memory, encoder_reads=reads)
            if bool(live.all()):
                state = new
                continue
            state = {
                name: torch.where(live.view(-1, *([1] * (value.dim() - 1))), value, state[name])
                for name, value in new.items()
            }
        return state

    def initial_state_tensors(self) -> dict[str, Tensor]:
        """The encoder's part of a new session's state, attached to the graph (the learned
        initial reads and controller state get gradients)."""
        state = {"memory": self.initial_memory}
        for spec in self.state_specs()[1 : len(self._memory_names())]:
            state[spec.name] = self.initial_memory.new_zeros(spec.shape)
        state.update(
            encoder_reads=self.initial_reads, encoder_h=self.initial_h, encoder_c=self.initial_c
        )
        return state

    def _memory_names(self) -> list[str]:
        c = self.config
        specs = dnc_memory_specs(c.memory_rows, c.word_size, c.read_heads, c.use_links)
        return [spec.name for spec in specs]

    def start_reply(self, state: dict[str, Tensor]) -> ReplyStart:
        """The prior at the start of a reply, from `encode_context`'s state."""
        return self._start_reply(state["encoder_h"], state["memory"], rowwise=False)

    def decode_teacher_forced(
        self, state: dict[str, Tensor], start: ReplyStart, z: Tensor, reply_inputs: Tensor
    ) -> Tensor:
        """Logits `[B, T, vocab]` of the reply given its inputs `[B, T]` (<bos> then the
        reply's tokens), z `[B, latent]`, and the context's state."""
        h, c, reads = state["encoder_h"], state["encoder_c"], start.reads
        memory = state["memory"]
        embedded = self.embedding(reply_inputs)
        logits = []
        for t in range(reply_inputs.shape[1]):
            step_logits, reads, h, c = self._decoder_step(
                embedded[:, t], z, reads, h, c, memory, rowwise=False
            )
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    def posterior_parameters(
        self, state: dict[str, Tensor], start: ReplyStart, reply_targets: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q(z | context, reply): mean and log-variance `[B, latent]` from the reply's tokens
        `[B, T]` (their first `lengths[b]` count: the reply and its <eos>), the prior's reads
        and the encoder's top hidden state."""
        outputs, _ = self.reply_reader(self.embedding(reply_targets))
        index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        summary = outputs.gather(1, index).squeeze(1)
        features = torch.cat([state["encoder_h"][:, -1], start.reads.flatten(1), summary], dim=1)
        mean, log_var = self.posterior(features)
        return mean, log_var

    def reply_terms(
        self,
        state: dict[str, Tensor],
        reply_inputs: Tensor,
        reply_targets: Tensor,
        reply_lengths: Tensor,
        noise: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """From a batch's encoder `state`: the reply's logits `[B, T, vocab]` with z drawn from
        the posterior by reparameterisation (`noise` `[B, latent]` standard normal), the KL
        bound `[B]` against the prior, and that z `[B, latent]`."""
        start = self.start_reply(state)
        mean, log_var = self.posterior_parameters(state, start, reply_targets, reply_lengths)
        z = mean + torch.exp(0.5 * log_var) * noise
        kl = mixture_kl_bound(mean, log_var, start.log_weights, start.means, start.log_variances)
        return self.decode_teacher_forced(state, start, z, reply_inputs), kl, z

    def prior_reply_logits(
        self, state: dict[str, Tensor], reply_inputs: Tensor, noise: Tensor, uniform: Tensor
    ) -> Tensor:
        """From a batch's encoder `state`: the reply's logits `[B, T, vocab]` with z drawn from
        the prior by `noise` and `uniform` as `begin_reply` draws it (what serving computes)."""
        start = self.start_reply(state)
        z = sample_prior(start, noise, uniform)
        return self.decode_teacher_forced(state, start, z, reply_inputs)

    def bag_of_words_logits(self, state: dict[str, Tensor], z: Tensor) -> Tensor:
        """The bag-of-words head's logits `[B, vocab]` from [h_0; z] (needs `bag_of_words`)."""
        if self.bag_of_words is None:
            raise ValueError("this VMED has no bag-of-words head (bag_of_words=False)")
        logits: Tensor = self.bag_of_words(torch.cat([state["encoder_h"][:, -1], z], dim=1))
        return logits

    def training_terms(
        self,
        context: Tensor,
        context_mask: Tensor,
        reply_inputs: Tensor,
        reply_targets: Tensor,
        reply_lengths: Tensor,
        noise: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Reply logits `[B, T, vocab]` with z drawn from the posterior by reparameterisation
        (`noise` `[B, latent]` standard normal), and the KL bound `[B]` against the prior."""
        state = self.encode_context(context, context_mask)
        logits, kl, _ = self.reply_terms(state, reply_inputs, reply_targets, reply_lengths, noise)
        return logits, kl

    def reply_logits(
        self,
        context: Tensor,
        context_mask: Tensor,
        reply_inputs: Tensor,
        noise: Tensor,
        uniform: Tensor,
    ) -> Tensor:
        """Reply logits `[B, T, vocab]` with z drawn from the prior by `noise` and `uniform`
        as `begin_reply` draws it: what serving computes, for validation and tests."""
        state = self.encode_context(context, context_mask)
        return self.prior_reply_logits(state, reply_inputs, noise, uniform)

    def forward(self, inputs: Tensor, activate: bool = True) -> Tensor:
        """The language-model view (`step` from a new session): next-token probabilities
        (logits with `activate=False`) `[B, T, vocab]` for previous-token rows `[B, T, vocab]`
        (one-hot for tokens), empty memory, z = 0."""
        batch = inputs.shape[0]
        initial = self.initial_state_tensors()
        memory = initial["memory"].expand(batch, -1, -1)
        h = self.initial_h.expand(batch, -1, -1)
        c = self.initial_c.expand(batch, -1, -1)
        reads = inputs.new_zeros(batch, self.config.mixture_components, self.config.word_size)
        z = inputs.new_zeros(batch, self.config.latent_size)
        outputs = []
        for t in range(inputs.shape[1]):
            embedded = inputs[:, t] @ self.embedding.weight
            logits, reads, h, c = self._decoder_step(embedded, z, reads, h, c, memory, False)
            outputs.append(logits)
        logits = torch.stack(outputs, dim=1)
        return torch.softmax(logits, dim=-1) if activate else logits

    # --- serving: in place on a state pool --------------------------------------------------

    def _live(self, pool: StatePool, slots: Tensor, rows: dict[str, Tensor]) -> Tensor:
        """Check a serving call; return the indices of its live (non-padding) rows."""
        if slots.dim() != 1 or slots.dtype != torch.int64:
            raise ValueError(f"slots must be 1-D int64, got {slots.dtype} {list(slots.shape)}")
        if pool.specs != self.state_specs():
            raise ValueError("the pool was not made for this model (its state specs differ)")
        for name, tensor in rows.items():
            if tensor.dim() == 0 or tensor.shape[0] != slots.shape[0]:
                raise ValueError(
                    f"{name} must have one row per slot ({slots.shape[0]}), "
                    f"got shape {list(tensor.shape)}"
                )
        validate_slots(slots, pool.capacity)
        return torch.nonzero(slots >= 0).flatten()

    def _check_tokens(self, name: str, tokens: Tensor, live: Tensor) -> None:
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"{name} must be 1-D int64, got {tokens.dtype} {list(tokens.shape)}")
        used = tokens[live]
        if used.numel() and not bool(((used >= 0) & (used < self.config.vocab_size)).all()):
            raise ValueError(f"{name} must be token ids in 0..{self.config.vocab_size - 1}")

    @torch.no_grad()
    def encode(self, pool: StatePool, slots: Tensor, tokens: Tensor, check: bool = True) -> None:
        """Write one token per session into its memory: `tokens` int64 `[B]` (ignored on
        padding rows). A turn is its tokens, then <eos>, whoever said it. `check=False`: the
        trusted path of `MemoryModel.step` (no checks, no padding)."""
        if check:
            live = self._live(pool, slots, {"tokens": tokens})
            self._check_tokens("tokens", tokens, live)
            if live.numel() == 0:
                return
            slots, tokens = slots[live], tokens[live]
        h, c, interface = self._encoder_step(
            tokens, pool["encoder_reads"][slots], pool["encoder_h"][slots],
            pool["encoder_c"][slots], rowwise=True,
        )  # fmt: skip
        cfg = self.config
        if cfg.uses_memory:
            if cfg.usage_decay != 1:
                pool["usage"][slots] *= cfg.usage_decay
            parameters = split_interface(interface, cfg.read_heads, cfg.word_size, cfg.use_links)
            pool["encoder_reads"][slots] = dnc_pool_step(pool, slots, parameters, cfg.use_links)
        pool["encoder_h"][slots] = h
        pool["encoder_c"][slots] = c

    @torch.no_grad()
    def begin_reply(
        self, pool: StatePool, slots: Tensor, noise: Tensor, uniform: Tensor, check: bool = True
    ) -> None:
        """Start a reply in each session: the decoder from the encoder's state, the first
        reads, and z drawn from the prior with `noise` float `[B, latent]` (standard normal)
        and `uniform` float `[B]` (in [0, 1), picks the component; see the module docstring).
        The memory and the encoder's state are not changed. `check=False`: as `encode`."""
        if check:
            live = self._live(pool, slots, {"noise": noise, "uniform": uniform})
            self._check_randomness(slots, noise, uniform)
            if live.numel() == 0:
                return
            slots, noise, uniform = slots[live], noise[live], uniform[live]
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("noise holds NaN or Inf")
            if not bool(((uniform >= 0) & (uniform < 1)).all()):
                raise ValueError("uniform must be in [0, 1)")
        h, c = pool["encoder_h"][slots], pool["encoder_c"][slots]
        start = self._start_reply(h, pool["memory"][slots], rowwise=True)
        pool["z"][slots] = sample_prior(start, noise.float(), uniform.float())
        pool["decoder_reads"][slots] = start.reads
        pool["decoder_h"][slots] = h
        pool["decoder_c"][slots] = c

    def _check_randomness(self, slots: Tensor, noise: Tensor, uniform: Tensor) -> None:
        latent = self.config.latent_size
        if noise.dim() != 2 or noise.shape[1] != latent or not noise.is_floating_point():
            raise ValueError(
                f"noise must be a float tensor of shape [{slots.shape[0]}, {latent}], "
                f"got {noise.dtype} {list(noise.shape)}"
            )
        if uniform.dim() != 1 or not uniform.is_floating_point():
            raise ValueError(f"uniform must be a 1-D float tensor, got {uniform.dtype}")

    def _decode_embedded(self, pool: StatePool, at: Tensor, embedded: Tensor) -> Tensor:
        logits, reads, h, c = self._decoder_step(
            embedded, pool["z"][at], pool["decoder_reads"][at], pool["decoder_h"][at],
            pool["decoder_c"][at], pool["memory"][at], rowwise=True,
        )  # fmt: skip
        pool["decoder_reads"][at] = reads
        pool["decoder_h"][at] = h
        pool["decoder_c"][at] = c
        return logits

    @torch.no_grad()
    def decode(
        self,
        pool: StatePool,
        slots: Tensor,
        previous_tokens: Tensor,
        presence_penalty: Tensor | None = None,
        check: bool = True,
    ) -> Tensor:
        """One decoder step per session: `previous_tokens` int64 `[B]` (<bos> first, then the
        token chosen last) -> logits float32 `[B, vocab]` of the next token (zeros for padding
        rows). Reads the memory, never writes it; records the previous token in `said`.
        `presence_penalty` float `[B]` (>= 0; None: 0) is taken off the logits of every token
        the session has said, this one included. `check=False`: as `encode`."""
        penalty = presence_penalty
        if penalty is None:
            penalty = torch.zeros_like(previous_tokens, dtype=torch.float32)

        def run(at: Tensor, previous: Tensor, penalty: Tensor) -> Tensor:
            pool["said"][at, previous] = previous != BOS
            logits = self._decode_embedded(pool, at, self.embedding(previous))
            if presence_penalty is None:
                return logits
            return logits - penalty.float().unsqueeze(1) * pool["said"][at]

        if not check:
            return run(slots, previous_tokens, penalty)
        live = self._live(
            pool, slots, {"previous_tokens": previous_tokens, "presence_penalty": penalty}
        )
        self._check_tokens("previous_tokens", previous_tokens, live)
        if penalty.dim() != 1 or not penalty.is_floating_point():
            raise ValueError(f"presence_penalty must be a 1-D float tensor, got {penalty.dtype}")
        used = penalty[live]
        if not bool((torch.isfinite(used) & (used >= 0)).all()):
            raise ValueError("presence_penalty must be finite and >= 0")
        return on_live_rows(slots, (previous_tokens, penalty), self.config.vocab_size, run)

    @torch.no_grad()
    def step(self, pool: StatePool, slots: Tensor, inputs: Tensor, check: bool = True) -> Tensor:
        """`decode` with the previous token as a row of `inputs` `[B, vocab]` (one-hot for a
        token), returning next-token probabilities (zeros for padding rows)."""

        def run(at: Tensor, rows: Tensor) -> Tensor:
            given = rows.float()
            said = pool["said"][at] | (given >= 0.5)
            said[:, BOS] = False
            pool["said"][at] = said
            embedded = rowwise_product(given, self.embedding.weight.t())
            return torch.softmax(self._decode_embedded(pool, at, embedded), dim=-1)

        if not check:
            return run(slots, inputs)
        self.check_step_inputs(pool, slots, inputs)
        return on_live_rows(slots, (inputs,), self.output_size, run)

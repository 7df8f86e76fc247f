"""Text generation on a dialogue model (VMED): one Generate call as a sequence of one-token
operations that the engine's batch loop interleaves with every other session's work.

A call goes through four phases, one operation per launch:
1. `prompt`: each token of the user's text, then <eos>, is written into memory (`encode`);
2. `begin`: the decoder starts and z is drawn from the prior (`begin_reply`);
3. `decode`: one token per launch (`decode`: the logits, sampled in the model's process by
   `serving.sampling` for every row of the launch at once), until <eos>, a stop string or
   max_tokens; each new piece of text goes to the caller at once;
4. `reply`: the reply's tokens, then <eos>, are written into memory (`encode`), so the next
   turn remembers what the model said.

Randomness comes from one numpy generator per call, seeded by the request's seed (else the
session's, else fresh entropy), which draws z's noise and one uniform number per token that
the sampler turns into a token: the same seed with the same history gives the same reply.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from models.tokenizer import BOS, EOS
from models.tokenizer import decode as decode_tokens
from models.tokenizer import encode as encode_tokens
from protos import memserve_pb2
from serving.calls import Call
from serving.errors import FailedPrecondition, InvalidArgument
from serving.protocol import BeginRow, DecodeRow, ModelCard, Operation

DEFAULT_MAX_TOKENS = 64
MAX_PROMPT_CHARACTERS = 4096
MAX_STOP_STRINGS = 8


def text_tokenizer(card: ModelCard) -> Tokenizer | None:
    """The tokenizer of a model that generates text; None for one that does not."""
    if not card.text_operations or card.tokenizer_json is None:
        return None
    return Tokenizer.from_str(card.tokenizer_json)


def require_text(tokenizer: Tokenizer | None, card: ModelCard, name: str) -> Tokenizer:
    """The tokenizer, or FAILED_PRECONDITION saying the model does not generate text."""
    if tokenizer is None:
        raise FailedPrecondition(
            f"model {name!r} ({card.model_type}) does not generate text; Generate needs a "
            "dialogue model such as vmed-chat"
        )
    return tokenizer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # off the logits of the tokens said in the conversation

    @classmethod
    def checked(
        cls,
        max_tokens: int,
        limit: int,
        temperature: float | None,
        top_k: int,
        top_p: float | None,
        stop: list[str],
        presence_penalty: float | None = None,
    ) -> Sampling:
        """From request fields; INVALID_ARGUMENT naming the first one out of range."""
        if not 0 <= max_tokens <= limit:
            raise InvalidArgument(f"max_tokens must be between 1 and {limit} (0: default)")
        temperature = 1.0 if temperature is None else temperature
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0: no limit), got {top_k}")
        top_p = 1.0 if top_p is None else top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        presence_penalty = 0.0 if presence_penalty is None else presence_penalty
        if not (math.isfinite(presence_penalty) and presence_penalty >= 0):
            raise InvalidArgument(f"presence_penalty must be >= 0, got {presence_penalty}")
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise InvalidArgument(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return cls(
            max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, limit),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=tuple(stop),
            presence_penalty=presence_penalty,
        )


def prompt_tokens(tokenizer: Tokenizer, text: str, limit: int) -> list[int]:
    """The user's text as tokens, then <eos>; INVALID_ARGUMENT if empty or too long."""
    if not text.strip():
        raise InvalidArgument("text is empty")
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise InvalidArgument(f"text has {len(text)} characters; at most {MAX_PROMPT_CHARACTERS}")
    tokens = encode_tokens(tokenizer, text)
    if len(tokens) + 1 > limit:
        raise InvalidArgument(f"text is {len(tokens)} tokens; at most {limit - 1}")
    return [*tokens, EOS]


@dataclass(eq=False, kw_only=True)
class GenerateCall(Call):
    """One Generate call, advanced one operation per launch (see the module docstring)."""

    prompt: list[int]  # the user's tokens, then <eos>
    sampling: Sampling
    rng: np.random.Generator
    tokenizer: Tokenizer
    latent_size: int
    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)  # None: done
    phase: str = "prompt"
    position: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the reply so far (all of it once finished)
    sent: int = 0  # characters of `text` already sent to the caller
    reply: list[int] = field(default_factory=list)
    finish_reason: str = ""
    sent_pieces: list[str] = field(default_factory=list)  # as the caller got them
    before: dict[str, torch.Tensor] | None = None  # the state before the turn, to undo it

    def next_row(self, most: int = 1) -> tuple[Operation, Any, int]:  # one at a time
        if self.phase == "prompt":
            return Operation.ENCODE, self.prompt[self.position], 1
        if self.phase == "begin":
            noise = self.rng.standard_normal(self.latent_size)
            return Operation.BEGIN, BeginRow(noise, self.rng.random()), 1
        if self.phase == "decode":
            s = self.sampling
            previous = self.generated[-1] if self.generated else BOS
            row = DecodeRow(
                previous, s.temperature, s.top_k, s.top_p, self.rng.random(), s.presence_penalty
            )
            return Operation.DECODE, row, 1
        return Operation.ENCODE, self.reply[self.position], 1

    def take(self, output: Any) -> bool:
        if self.phase == "prompt":
            self.position += 1
            if self.position == len(self.prompt):
                self.phase = "begin"
        elif self.phase == "begin":
            self.phase = "decode"
        elif self.phase == "decode":
            self._next_token(int(output))
        else:
            self.position += 1
            return self.position == len(self.reply)
        return False

    def _next_token(self, token: int) -> None:
        if token == EOS:
            self._finish("eos")
            return
        self.generated.append(token)
        self.text = decode_tokens(self.tokenizer, self.generated)
        cut = min((i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0),
                  default=-1)  # fmt: skip
        if cut >= 0:
            self.text = self.text[:cut]
            self._finish("stop")
        elif len(self.generated) >= self.sampling.max_tokens:
            self._finish("length")
        else:  # hold back what could still become the start of a stop string
            hold = max((len(s) - 1 for s in self.sampling.stop), default=0)
            self._send(len(self.text) - hold)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            piece = self.text[self.sent : upto]
            self.pieces.put_nowait(piece)
            self.sent_pieces.append(piece)
            self.sent = upto

    def done_message(self) -> memserve_pb2.GenerateDone:
        """The last message of the reply's stream."""
        return memserve_pb2.GenerateDone(
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated),
            text=self.text,
            step=self.result if self.result is not None else self.session.step,
        )

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._send(len(self.text))
        self.text = self.text.strip()
        # What memory remembers: the reply as sent (after a stop string is cut), then <eos>.
        self.reply = [*encode_tokens(self.tokenizer, self.text), EOS]
        self.phase, self.position = "reply", 0

    def finish(self, result: int | None = None, error: Exception | None = None) -> None:
        super().finish(result, error)
        self.pieces.put_nowait(None)

    async def stream(self) -> AsyncIterator[str]:
        """The reply's pieces as they are decoded; returns when the call is answered (its
        reply written to memory and, with a durable store, committed) and raises what the
        call failed with."""
        while (piece := await self.pieces.get()) is not None:
            yield piece
        if self.future is not None:
            await self.future
        elif self.error is not None:
            raise self.error

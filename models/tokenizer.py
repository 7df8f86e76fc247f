"""The dialogue model's tokenizer: byte-pair encoding trained with the `tokenizers` library.

Text is split on whitespace with the Metaspace pre-tokenizer (a word starts with "▁"), so
`decode(encode(text))` gives back text whose words are separated by single spaces, which is
the form of the Persona-Chat corpus. The special tokens have fixed ids, the first four of
the vocabulary: <pad> 0 (batch padding, never a target), <bos> 1 (the decoder's first input),
<eos> 2 (ends every utterance, written into memory as the turn separator and predicted as the
end of a reply), <unk> 3 (characters the training split never showed). The tokenizer is
saved with the model as `tokenizer.json` (the library's own format, plain JSON).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BPE tokenizer of at most `vocab_size` tokens (the special ones included) on `texts`.

    Deterministic: the same texts in the same order give the same tokenizer.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
    """Raise ValueError unless the special tokens have their ids (and, if given, the
    vocabulary has `vocab_size` tokens)."""
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise ValueError(
                f"special token {token} must have id {index}, has {tokenizer.token_to_id(token)}"
            )
    size = tokenizer.get_vocab_size()
    if vocab_size is not None and size != vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens, the model {vocab_size}")


def tokenizer_from_bytes(data: bytes, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer from the contents of a `tokenizer.json`, checked; ValueError if unusable."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text: {error}") from error
    except Exception as error:  # the library raises a plain Exception for bad JSON
        raise ValueError(f"not a tokenizers JSON file: {error}") from error
    check_tokenizer(tokenizer, vocab_size)
    return tokenizer


def tokenizer_to_bytes(tokenizer: Tokenizer) -> bytes:
    """The contents of `tokenizer.json`."""
    return tokenizer.to_str().encode("utf-8")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of token ids up to the first <eos>, special tokens dropped."""
    kept: list[int] = []
    for token in ids:
        if token == EOS:
            break
        kept.append(int(token))
    return str(tokenizer.decode(kept, skip_special_tokens=True))

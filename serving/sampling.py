"""The next token of every row of a decode launch, chosen in the model's process so that only
token ids cross the pipe. Rows are independent: a session's token does not depend on who
shares its launch."""

from __future__ import annotations

import numpy as np


def sample_tokens(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
) -> np.ndarray:
    """One token id per row of `logits` `[B, vocab]`, each row with its own settings `[B]`.

    Temperature 0 is greedy (the first most likely token). Otherwise the tokens are ranked
    by softmax(logits / T), most likely first and ties by token id; the `top_k` first are
    kept (0: all), then of those the fewest whose mass reaches `top_p` of theirs, and
    tokens exactly as likely as the last one kept are kept too. The token is where `uniform`
    in [0, 1) falls in the cumulative mass of the kept tokens in that order (inverse CDF).

    Only the scaled logits are sorted, never their indices (the chosen token's id is found
    by its value): sorting values is several times cheaper than an argsort
    (docs/performance.md, "Sampling").
    """
    vocab = logits.shape[1]
    scaled = logits / np.where(temperature > 0, temperature, 1).astype(np.float32)[:, None]
    ordered = np.sort(scaled, axis=1)[:, ::-1]  # most likely first
    mass = np.cumsum(np.exp(ordered - ordered[:, :1]), axis=1)  # unnormalised, cumulative
    tokens: np.ndarray = logits.argmax(axis=1)
    for row in np.flatnonzero(temperature > 0):
        values, cumulative = ordered[row], mass[row]
        limit = min(int(top_k[row]), vocab) if top_k[row] > 0 else vocab
        kept = min(limit, int(np.searchsorted(cumulative, top_p[row] * cumulative[limit - 1])) + 1)
        while kept < vocab and values[kept] == values[kept - 1]:
            kept += 1  # ties with the last one kept
        point = uniform[row] * cumulative[kept - 1]
        chosen = min(int(np.searchsorted(cumulative, point, side="right")), kept - 1)
        first = chosen  # the first rank of the chosen value: which of its tokens, by id
        while first > 0 and values[first - 1] == values[chosen]:
            first -= 1
        tokens[row] = np.flatnonzero(scaled[row] == values[chosen])[chosen - first]
    return tokens.astype(np.int64)

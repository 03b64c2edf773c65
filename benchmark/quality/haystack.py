"""Haystack text and fitting a prompt to a token length.

The noise haystack is a stream of short phrases of filler words in which about half of the phrases repeat
an earlier phrase. The stream is prefix-stable: the first ``n`` phrases of a seed never depend on ``n``, so a
prompt can be grown or shrunk phrase by phrase while everything else about the sample stays fixed.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol

from benchmark.quality.vocab import FILLER_WORDS


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def filler_phrases(rng: random.Random, n: int, repeat_frac: float = 0.5) -> list[str]:
    """``n`` phrases (3-6 filler words and a full stop), about ``repeat_frac`` of them repeats."""
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < repeat_frac:
            out.append(out[rng.randrange(max(0, len(out) - 64), len(out))])
        else:
            words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(3, 6))]
            out.append(" ".join(words).capitalize() + ".")
    return out


def count_tokens(tokenizer: Tokenizer | None, text: str) -> int:
    """Prompt tokens as the server counts them (special tokens included); words + punctuation without a tokenizer."""
    if tokenizer is None:
        return len(text.split()) + text.count(".")
    return len(tokenizer.encode(text))


def fit_units(build: Callable[[int], str], tokenizer: Tokenizer | None, max_tokens: int, lo: int = 0) -> tuple[int, str]:
    """The largest unit count ``n >= lo`` whose ``build(n)`` has at most ``max_tokens`` tokens (``lo`` if none).

    ``build`` must be monotone: more units never give fewer tokens. Exponential then binary search, so a
    32K-token prompt costs about 20 encodes.
    """
    if count_tokens(tokenizer, build(lo)) > max_tokens:
        return lo, build(lo)
    hi = max(lo + 1, 8)
    while count_tokens(tokenizer, build(hi)) <= max_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, build(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def insert_at_depths(phrases: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert ``(depth, text)`` items into a phrase list at relative depths in [0, 1] (stable for equal depths)."""
    out = list(phrases)
    order = sorted(range(len(items)), key=lambda i: (items[i][0], i), reverse=True)
    for i in order:  # deepest first, so earlier insertion points stay valid; ties keep their given order
        out.insert(round(items[i][0] * len(phrases)), items[i][1])
    return out

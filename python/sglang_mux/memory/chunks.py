"""Chunks: runs of tokens that end at a sentence end or a newline (or at ``--mux-chunk-tokens``), found from the
token stream. The chunk leaf (``sglang_mux.leaves.chunk``) reads whole chunks, so a fact that straddles a page
boundary is read whole rather than half.

    tokens   The cat sat .  It  is  7 3 1 9 .  \\n  Bye
    starts   0              4                   10 11         (a chunk starts after each delimiter token)
    max 4    0              4        8         10 11         (and every ``max_tokens`` tokens after a start)

A delimiter is a token whose text ends a sentence (``.``, ``!``, ``?``, optionally followed by quotes or
brackets) or holds a newline; ``:`` and ``;`` do not end a chunk (``the number is: 7319`` stays one chunk).

Prefix-closed: whether position ``i`` starts a chunk depends only on tokens ``0..i-1``. So the chunks of a
radix-tree node's tokens are the same for every request that shares the node, a node split cuts the chunk list
exactly where it cuts the tokens, and a chunk may straddle two nodes (it is the same chunk seen from either
request). That is why chunks are computed from each request's token ids (one vectorized pass over the prompt,
a few microseconds per thousand tokens, at the first step whose split has the chunk leaf: ``RequestMemory``
keeps a reference to the admitted ids until then) instead of being stored in the tree: the tree's tokens
determine them. Tokens past the ones known at admission (the decoded ones) are cut every ``max_tokens``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_SENTENCE_END = (".", "!", "?", "。", "！", "？")
_TRAILING = "\"')]}»”’ \t"


def is_delimiter_text(text: str) -> bool:
    """Whether a token with this text ends a chunk: a newline anywhere, or a sentence end at its end."""
    if "\n" in text:
        return True
    return text.rstrip(_TRAILING).endswith(_SENTENCE_END)


def delimiter_table(tokenizer) -> torch.Tensor:
    """``bool[vocab]``: which token ids are delimiters, for this tokenizer (~0.5 s for a 50K vocabulary: one batched
    decode; ``RequestRegistry.delimiter_table`` keeps it per tokenizer)."""
    n = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return torch.tensor([is_delimiter_text(t) for t in texts], dtype=torch.bool)


def delimiter_mask(token_ids: Sequence[int] | torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``bool[len(token_ids)]``: which tokens end a chunk (ids outside the table never do)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    inside = (ids >= 0) & (ids < table.numel())
    out = torch.zeros(ids.numel(), dtype=torch.bool)
    out[inside] = table[ids[inside]]
    return out


def chunk_starts(delims: torch.Tensor, max_tokens: int, seq_len: Optional[int] = None) -> torch.Tensor:
    """Sorted start positions of the chunks of the first ``seq_len`` tokens (default: ``len(delims)``; positions past
    the known delimiters are cut every ``max_tokens``). ``delims``: ``bool[known tokens]``.

    Worked example: delims at 3 and 9 of 12 tokens, max 4 -> natural starts 0, 4, 10; the 6-token chunk at 4 is
    cut at 8 -> ``[0, 4, 8, 10]``.
    """
    if max_tokens < 1:
        raise ValueError(f"chunk_starts: max_tokens must be >= 1, got {max_tokens}")
    known = int(delims.numel())
    L = known if seq_len is None else int(seq_len)
    if L <= 0:
        return torch.zeros(0, dtype=torch.long)
    natural = delims[: min(known, L)].nonzero().flatten() + 1
    natural = torch.cat([torch.zeros(1, dtype=torch.long), natural[natural < L]])
    ends = torch.cat([natural[1:], torch.tensor([L])])
    pieces = (ends - natural + max_tokens - 1) // max_tokens  # >= 1 each
    base = torch.repeat_interleave(natural, pieces)
    offsets = torch.arange(int(pieces.sum())) - torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
    return base + offsets * max_tokens


def chunk_page_spans(starts: torch.Tensor, seq_len: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first_page, last_page)`` of every chunk (inclusive): a chunk of tokens ``[s, e)`` covers pages
    ``s // P .. (e - 1) // P``. Two chunks share a page when a boundary falls inside it."""
    ends = torch.cat([starts[1:], torch.tensor([seq_len], dtype=torch.long)])
    return starts // page_size, (ends - 1) // page_size


def page_spans_for(delims: Optional[torch.Tensor], seq_len: int, page_size: int, max_tokens: int):
    """The chunk page spans of a request of ``seq_len`` tokens whose known tokens' delimiters are ``delims``
    (None: nothing known, every chunk is ``max_tokens`` long)."""
    d = delims if delims is not None else torch.zeros(0, dtype=torch.bool)
    return chunk_page_spans(chunk_starts(d, max_tokens, seq_len), seq_len, page_size)

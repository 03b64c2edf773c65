"""Route or not: the one rule, as pure functions of integers.

Every caller passes the request's *effective* budget (the server's ``--mux-budget``, or the request's own
``mux_budget``), so the radix cache, the attention backend and the router always agree on a request.

    budget B tokens, context L tokens, exact = the request asked for exact attention (``mux_exact``)
    routes_now   L > B and not exact          the grant is routed this step (router/grant.py)
    may_route    L > B // 2 and not exact     routed now or soon: prepare while it is still exact
                                              (heavy-hitter scores at prefill, recompute the prompt's
                                              observation window instead of taking it from the cache,
                                              drop or tier cold pages)

Worked example, B = 1024: L = 512 -> exact, nothing prepared; L = 513 -> exact, prepared; L = 1025 -> routed.
"""

from __future__ import annotations


def routes_now(seq_len: int, budget: int, exact: bool = False) -> bool:
    """True when a request of ``seq_len`` tokens attends to a routed selection of its pages this step."""
    return not exact and seq_len > budget


def may_route(seq_len: int, budget: int, exact: bool = False) -> bool:
    """True when a request of ``seq_len`` tokens is routed now or may be once decode grows it past ``budget``."""
    return not exact and seq_len > budget // 2


def scores_heavy_hitters(seq_len: int, budget: int, heavy_tokens: int, exact: bool = False) -> bool:
    """True when prefill must score heavy hitters for this request: it may be routed and its split gives tokens
    to leaves that rank pages by them (``heavy_tokens``, see :func:`heavy_ranked_tokens`)."""
    return heavy_tokens > 0 and may_route(seq_len, budget, exact)


def heavy_ranked_tokens(cfg) -> int:
    """Tokens of a config's split whose pages are ranked by heavy-hitter scores: the heavy share, plus the chunk
    share when ``--mux-chunk-score heavy`` (``cfg``: a ``MuxConfig``, the request's effective one)."""
    split = cfg.leaf_split(cfg.budget)
    return split["heavy"] + (split.get("chunk", 0) if cfg.chunk_score == "heavy" else 0)

"""KV policies compared at one device-KV budget, all as configurations of the mux server's own leaves, so
the comparison runs in one server and only the policy changes (per request, in ``custom_params``):

=========== ============================================ ==========================================
name        custom_params                                 what it is
=========== ============================================ ==========================================
full        ``{"mux_exact": true}``                      exact attention over the whole context
streaming   ``mux_budget`` + ``sink=64,recent=rest``     StreamingLLM: attention sinks + a window
snapkv      ``mux_budget`` + ``sink=16,heavy=rest``      SnapKV-style prefill-scored heavy hitters
quest       ``mux_budget`` + ``sink=16,retrieval=rest``  Quest-style query-aware top-k pages, ranked as
            + ``mux_retrieval_score: "bound"``           Quest does (max over heads of the raw bound)
quest_mass  as ``quest`` with ``"mass"``                 the same pages ranked by estimated attention mass
chunk       ``mux_budget`` + ``sink=16,chunk=rest``      whole chunks (sentences) ranked by their best page
mux         ``mux_budget`` only                          the combined mux default split (``mass`` ranking)
mux_chunk   the mux default split, its retrieval         the default with whole chunks instead of pages
            share spent by the chunk leaf
mux_chunk_shared ``mux_chunk`` + ``mux_chunk_layers:``    one chunk choice per step for every layer
            ``"shared"``                                  (ChunkKV-style)
mux_both    the mux default split, its retrieval         retrieval picks pages, the chunk leaf completes
            share halved between retrieval and chunk     the chunks they belong to
mux_pyramid ``mux`` + ``mux_layer_budget: "pyramid"``     the default split, more pages at lower layers
mux_adaptive ``mux`` + ``"adaptive"``                    pages per layer from the prefill's attention
adaptive    ``mux`` + ``mux_router: "adaptive"``         the adaptive router (docs/router.md): the split
                                                         and layer spread follow the attention, with
                                                         triggers and hysteresis
learned     ``mux`` + ``mux_router: "learned"``          the adaptive router with the learned gate's split
adaptive_chunk ``mux_chunk`` + ``"adaptive"`` router     the adaptive router over the chunk split
mux_int8    ``mux`` + ``mux_cold_bits: 8`` (and 4, 2)    quantized cold pages: with a host/disk tier, device
                                                         copies of demoted pages; with --mux-drop-cold, more
                                                         cold pages kept in the same bytes (docs/memory.md)
mux_int4_pyramid ``mux_int4`` + ``"pyramid"`` layers     (and ``mux_int4_adaptive``)
=========== ============================================ ==========================================

The budget is in tokens: a fixed ``--budget`` or a fraction of each prompt (``--budget-frac``). Under a
budget below 4x the sink size the sink shrinks to a quarter of the budget (``sink=15,recent=rest`` at 62
tokens), so short prompts stay valid requests.
"""

from __future__ import annotations

import math

# policy -> (sink tokens, the leaf that takes the rest of the budget, retrieval score rule or None for the
# server's); None: no leaf split of our own.
POLICIES: dict[str, tuple[int, str, str | None] | None] = {
    "full": None,
    "streaming": (64, "recent", None),
    "snapkv": (16, "heavy", None),
    "quest": (16, "retrieval", "bound"),
    "quest_mass": (16, "retrieval", "mass"),
    "chunk": (16, "chunk", "mass"),
    "mux": None,
    "mux_chunk": None,
    "mux_chunk_shared": None,
    "mux_both": None,
    "mux_pyramid": None,
    "mux_adaptive": None,
    "adaptive": None,
    "learned": None,
    "adaptive_chunk": None,
    "mux_int8": None,
    "mux_int4": None,
    "mux_int2": None,
    "mux_int4_pyramid": None,
    "mux_int4_adaptive": None,
}

# policy -> (the policy whose split it starts from, --mux-router)
_ROUTER_VARIANTS = {"adaptive": ("mux", "adaptive"), "learned": ("mux", "learned"),
                    "adaptive_chunk": ("mux_chunk", "adaptive")}

# policy -> --mux-layer-budget of the default split
_LAYER_BUDGET_VARIANTS = {"mux_pyramid": "pyramid", "mux_adaptive": "adaptive"}

# policy -> share of the default split's retrieval tokens given to the chunk leaf
_DEFAULT_SPLIT_VARIANTS = {"mux_chunk": 1.0, "mux_both": 0.5}


class PolicyError(ValueError):
    """Unknown policy or a bad budget; the message names the flag and the allowed values."""


def parse_policies(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise PolicyError(f"--policies: unknown {bad[0]!r}; allowed: {', '.join(POLICIES)}" if bad else
                          f"--policies: empty; allowed: {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def budget_tokens(n_tokens: int, budget: int | None, budget_frac: float | None) -> int:
    """Device-KV budget of one request: ``budget`` if given, else ``ceil(budget_frac * n_tokens)``."""
    if budget is not None:
        if budget <= 0:
            raise PolicyError(f"--budget: must be a positive number of tokens, got {budget}")
        return budget
    if budget_frac is None or not (0.0 < budget_frac <= 1.0):
        raise PolicyError(f"--budget-frac: must be in (0, 1], got {budget_frac}")
    return max(1, math.ceil(budget_frac * n_tokens))


def custom_params(policy: str, budget: int) -> dict:
    """The ``sampling_params.custom_params`` of a request under ``policy`` with a ``budget``-token device KV."""
    if policy not in POLICIES:
        raise PolicyError(f"policy: unknown {policy!r}; allowed: {', '.join(POLICIES)}")
    if policy == "full":
        return {"mux_exact": True}
    if policy.startswith("mux_int"):
        bits, _, layers = policy[len("mux_int"):].partition("_")
        return {"mux_budget": budget, "mux_cold_bits": int(bits), **({"mux_layer_budget": layers} if layers else {})}
    if policy == "mux_chunk_shared":
        return {**custom_params("mux_chunk", budget), "mux_chunk_layers": "shared"}
    if policy in _ROUTER_VARIANTS:
        base, router = _ROUTER_VARIANTS[policy]
        return {**custom_params(base, budget), "mux_router": router}
    params: dict = {"mux_budget": budget}
    if policy in _LAYER_BUDGET_VARIANTS:
        params["mux_layer_budget"] = _LAYER_BUDGET_VARIANTS[policy]
        return params
    if policy in _DEFAULT_SPLIT_VARIANTS:
        from sglang_mux.config import MuxConfig

        split = MuxConfig(budget=budget).leaf_split(budget)
        moved = round(split["retrieval"] * _DEFAULT_SPLIT_VARIANTS[policy])
        split["retrieval"] -= moved
        split["chunk"] += moved
        params["mux_leaves"] = ",".join(f"{k}={v}" for k, v in split.items() if v)
        return params
    split = POLICIES[policy]
    if split is not None:
        sink, rest, rule = split
        params["mux_leaves"] = f"sink={min(sink, budget // 4)},{rest}=rest"
        if rule is not None:
            params["mux_retrieval_score"] = rule
    return params


def leaves_spec(policy: str, budget: int) -> str | None:
    """The ``mux_leaves`` string a policy sends at ``budget`` (None: the server's default split)."""
    return custom_params(policy, budget).get("mux_leaves")

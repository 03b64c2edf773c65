"""Per-request mux options, carried in ``sampling_params.custom_params`` of a ``/generate`` request.

    {"text": "...", "sampling_params": {"max_new_tokens": 32,
        "custom_params": {"mux_budget": 1024, "mux_leaves": "sink=64,recent=256,retrieval=rest"}}}

``custom_params`` is SGLang's own per-request dict: it travels with the request to the scheduler, where the
router reads it. Fields (all optional; absent means the server's ``--mux-*`` value):

* ``mux_budget``  positive int: device-KV budget of this request in tokens.
* ``mux_leaves``  leaf split spec, as ``--mux-leaves``.
* ``mux_exact``   bool: exact full attention for this request whatever its length.
* ``mux_retrieval_score``  ``"mass"`` or ``"bound"``: how the retrieval leaf ranks pages, as ``--mux-retrieval-score``.
* ``mux_sparse_prefill``  bool: ``true`` prefills this prompt with block-sparse attention when it has at least
  ``--mux-sparse-prefill-min-tokens`` tokens (any length when that flag is 0, i.e. off for other requests);
  ``false`` (or absent with ``mux_exact``) prefills it exactly whatever its length.
* ``mux_cold_bits``  16, 8, 4 or 2: precision of this request's cold pages, as ``--mux-cold-bits``.
* ``mux_layer_budget``  ``"uniform"``, ``"pyramid"`` or ``"adaptive"``: how its pages spread over layers, as
  ``--mux-layer-budget``.
* ``mux_chunk_score``  ``"heavy"`` or ``"quest"``: what ranks the chunk leaf's chunks, as ``--mux-chunk-score``.
* ``mux_chunk_layers``  ``"per-layer"`` or ``"shared"``: one chunk choice per layer or per step, as ``--mux-chunk-layers``.
* ``mux_router``  ``"static"``, ``"adaptive"`` or ``"learned"``: the router policy of this request, as ``--mux-router``.

Validated by :func:`parse_request_options` both at the HTTP edge (HTTP 400 naming the field) and in the
scheduler (a second line: the request is aborted with the same message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sglang_mux.config import (
    CHUNK_LAYER_MODES,
    CHUNK_SCORE_RULES,
    COLD_BITS,
    LAYER_BUDGET_POLICIES,
    RETRIEVAL_SCORE_RULES,
    ROUTER_POLICY_NAMES,
    MuxConfig,
    MuxConfigError,
)

FIELD_PREFIX = "sampling_params.custom_params."
KNOWN_FIELDS = ("mux_budget", "mux_leaves", "mux_exact", "mux_retrieval_score", "mux_sparse_prefill", "mux_cold_bits",
                "mux_layer_budget", "mux_chunk_score", "mux_router",
                "mux_chunk_layers")
MAX_BUDGET = 1 << 24


class MuxRequestError(ValueError):
    """A malformed per-request mux field; the message names the field and the allowed values."""


@dataclass(frozen=True)
class MuxRequestOptions:
    budget: int | None = None
    leaves: str | None = None
    exact: bool = False
    retrieval_score: str | None = None
    sparse_prefill: bool | None = None
    cold_bits: int | None = None
    layer_budget: str | None = None
    chunk_score: str | None = None
    router: str | None = None
    chunk_layers: str | None = None

    def prefills_sparsely(self, server: MuxConfig, prompt_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens`` tokens is prefilled with block-sparse attention (the rule of
        ``mux_sparse_prefill`` above). Example: server min 4096; absent -> 5000 tokens yes, 3000 no; true with
        the server at 0 -> yes; false -> no; absent with ``mux_exact`` -> no."""
        threshold = server.sparse_prefill_min_tokens
        if self.sparse_prefill is False or (self.sparse_prefill is None and (threshold == 0 or self.exact)):
            return False
        return prompt_tokens >= threshold

    def effective_config(self, server: MuxConfig) -> MuxConfig:
        """The server config with this request's overrides applied (validated)."""
        # fields that override the server's --mux-* field of the same name
        overridable = ("budget", "leaves", "retrieval_score", "cold_bits", "layer_budget", "chunk_score", "router",
                       "chunk_layers")
        changes: dict[str, Any] = {f: getattr(self, f) for f in overridable if getattr(self, f) is not None}
        if not changes:
            return server
        # A smaller per-request budget shrinks explicitly set sink/window parts to fit rather than failing.
        budget = changes.get("budget", server.budget)
        if server.window_tokens > budget:
            changes["window_tokens"] = budget
        if server.sink_tokens > budget - min(server.window, budget):
            changes["sink_tokens"] = max(0, budget - min(server.window, budget))
        try:
            return server.replace(**changes)
        except MuxConfigError as e:
            raise MuxRequestError(f"{FIELD_PREFIX}mux_leaves: {e}") from None


def parse_request_options(custom_params: Mapping[str, Any] | None) -> MuxRequestOptions:
    if not custom_params:
        return MuxRequestOptions()
    if not isinstance(custom_params, Mapping):
        raise MuxRequestError(f"sampling_params.custom_params: expected an object, got {type(custom_params).__name__}")
    unknown = sorted(k for k in custom_params if isinstance(k, str) and k.startswith("mux_") and k not in KNOWN_FIELDS)
    if unknown:
        raise MuxRequestError(
            f"{FIELD_PREFIX}{unknown[0]}: unknown mux field; allowed: {', '.join(KNOWN_FIELDS)}"
        )
    budget = custom_params.get("mux_budget")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or not (0 < budget <= MAX_BUDGET):
            raise MuxRequestError(
                f"{FIELD_PREFIX}mux_budget: must be an integer number of tokens in [1, {MAX_BUDGET}], got {budget!r}"
            )
    leaves = custom_params.get("mux_leaves")
    if leaves is not None:
        if not isinstance(leaves, str):
            raise MuxRequestError(f"{FIELD_PREFIX}mux_leaves: expected a string like 'sink=64,recent=512,retrieval=rest'")
        try:
            MuxConfig(budget=budget or MAX_BUDGET, sink_tokens=0, window_tokens=0).replace(leaves=leaves)
        except MuxConfigError as e:
            raise MuxRequestError(f"{FIELD_PREFIX}mux_leaves: {str(e).split(': ', 1)[-1]}") from None
    exact = custom_params.get("mux_exact", False)
    if not isinstance(exact, bool):
        raise MuxRequestError(f"{FIELD_PREFIX}mux_exact: expected true or false, got {exact!r}")
    score = custom_params.get("mux_retrieval_score")
    if score is not None and score not in RETRIEVAL_SCORE_RULES:
        raise MuxRequestError(f"{FIELD_PREFIX}mux_retrieval_score: allowed: {', '.join(RETRIEVAL_SCORE_RULES)}; got {score!r}")
    sparse = custom_params.get("mux_sparse_prefill")
    if sparse is not None and not isinstance(sparse, bool):
        raise MuxRequestError(f"{FIELD_PREFIX}mux_sparse_prefill: expected true or false, got {sparse!r}")
    cold_bits = custom_params.get("mux_cold_bits")
    if cold_bits is not None and (isinstance(cold_bits, bool) or not isinstance(cold_bits, int) or cold_bits not in COLD_BITS):
        raise MuxRequestError(
            f"{FIELD_PREFIX}mux_cold_bits: allowed: {', '.join(map(str, COLD_BITS))}; got {cold_bits!r}"
        )
    return MuxRequestOptions(
        budget=budget, leaves=leaves, exact=exact, retrieval_score=score, sparse_prefill=sparse, cold_bits=cold_bits,
        layer_budget=_choice(custom_params, "mux_layer_budget", LAYER_BUDGET_POLICIES),
        chunk_score=_choice(custom_params, "mux_chunk_score", CHUNK_SCORE_RULES),
        router=_choice(custom_params, "mux_router", ROUTER_POLICY_NAMES),
        chunk_layers=_choice(custom_params, "mux_chunk_layers", CHUNK_LAYER_MODES),
    )


def _choice(custom_params: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    """A string field that must be one of ``allowed`` (absent: None)."""
    v = custom_params.get(name)
    if v is not None and v not in allowed:
        raise MuxRequestError(f"{FIELD_PREFIX}{name}: allowed: {', '.join(allowed)}; got {v!r}")
    return v

"""MuxConfig: every ``--mux-*`` knob, validated once, carried to SGLang's processes as JSON.

The launcher parses our flags, builds a :class:`MuxConfig` (which validates itself) and exports it
in ``SGLANG_MUX_CONFIG``; scheduler processes read it back with :meth:`MuxConfig.from_env`. A server
started with plain ``python -m sglang.launch_server --radix-cache-backend mux`` has no variable and gets
the defaults. The CLI is derived from the dataclass fields: adding a knob is adding a field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_VAR = "SGLANG_MUX_CONFIG"

def _leaf_names() -> tuple[str, ...]:
    # The leaf registry (sglang_mux.leaves) is the one source; imported late: it needs torch, this module does not.
    from sglang_mux.leaves import leaf_names

    return leaf_names()


def __getattr__(name: str):
    # LEAF_NAMES: the names accepted in --mux-leaves, in split order, read from the leaf registry when asked.
    if name == "LEAF_NAMES":
        return _leaf_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# --mux-retrieval-score values (see sglang_mux.attention.routed_decode.combine_head_bounds).
RETRIEVAL_SCORE_RULES = ("mass", "bound")

# --mux-cold-bits values (16: exact; see sglang_mux.memory.quantized_pages, whose BITS must agree).
COLD_BITS = (16, 8, 4, 2)

# --mux-layer-budget values (see sglang_mux.router.layer_budget, whose LAYER_BUDGET_POLICIES must agree).
LAYER_BUDGET_POLICIES = ("uniform", "pyramid", "adaptive")

# --mux-router values (see sglang_mux.router.spine, whose registry must agree).
ROUTER_POLICY_NAMES = ("static", "adaptive", "learned")

# --mux-chunk-score values (see sglang_mux.leaves.chunk).
CHUNK_SCORE_RULES = ("heavy", "quest")

# --mux-chunk-layers values (see sglang_mux.leaves.chunk).
CHUNK_LAYER_MODES = ("per-layer", "shared")

# --mux-sparse-prefill-pattern values (see sglang_mux.attention.sparse_prefill).
SPARSE_PREFILL_PATTERNS = ("topk", "vertical_slash")


class MuxConfigError(ValueError):
    """A bad --mux-* value; the message names the flag and the allowed values (one line)."""


def _flag(name: str) -> str:
    return "--mux-" + name.replace("_", "-")


def _knob(default, help: str, metavar: str | None = None):
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class MuxConfig:
    disable: bool = _knob(False, "Serve with stock SGLang memory (no mux cache, no routed attention).")
    budget: int = _knob(
        2048,
        "Device-KV budget per request, in tokens: what routed decode attention reads per layer. "
        "A request whose context fits gets exact full attention.",
        "TOKENS",
    )
    page_size: int = _knob(16, "Mux page size in tokens (power of two): the unit of selection and tiering.", "N")
    sink_tokens: int = _knob(
        -1, "First tokens of every request that are always attended (attention sinks); -1: min(64, budget/8).", "TOKENS"
    )
    window_tokens: int = _knob(
        -1, "Most recent tokens that are always attended (exact window); -1: min(512, budget/4).", "TOKENS"
    )
    leaves: str = _knob(
        "",
        "Budget split across leaves, e.g. 'sink=64,recent=512,heavy=256,retrieval=rest'. "
        "Empty: sink/recent from --mux-sink-tokens/--mux-window-tokens, heavy=1/8 of the budget, retrieval=rest.",
        "SPEC",
    )
    drop_cold: bool = _knob(
        False,
        "Free the device KV of pages outside a request's hot leaves (its own unshared tail only), "
        "so device memory really shrinks. Default keeps every exact page.",
    )
    host_bytes: int = _knob(
        0,
        "Host-DRAM tier capacity in bytes (0: no host tier). With a tier, a routed request's cold pages leave the "
        "device (exact copies kept below) and are fetched into a staging area when retrieval selects them.",
        "BYTES",
    )
    disk_path: str = _knob("", "Directory of the disk tier (one CRC-checked file per page); needs --mux-disk-bytes.", "DIR")
    disk_bytes: int = _knob(0, "Disk tier capacity in bytes (0: no disk tier).", "BYTES")
    remote_backend: str = _knob(
        "",
        "Lowest tier through one of SGLang's HiCache storage backends ('file', 'mooncake', 'hf3fs', 'nixl'); holds "
        "copies of radix-tree prefix pages (the store may evict them). Empty: none.",
        "NAME",
    )
    remote_path: str = _knob("", "Directory for --mux-remote-backend file (other stores read their own config).", "DIR")
    remote_bytes: int = _knob(1 << 34, "Bytes of prefix pages sglang-mux keeps in the remote tier.", "BYTES")
    staging_pages: int = _knob(
        -1, "Device staging area per request, in pages, for pages fetched from lower tiers; -1: budget/page size.", "PAGES"
    )
    missing_page: str = _knob(
        "wait",
        "A selected page not yet in the staging area when attention runs: 'wait' (fetch it now, exact) or 'skip' "
        "(attend without it this step, fetch it in the background; counted in the stats).",
        "wait|skip",
    )
    inner_backend: str = _knob(
        "auto",
        "Attention backend that mux wraps for exact attention: 'auto' (flashinfer on GPU, torch_native on CPU) "
        "or any SGLang backend name. `--attention-backend X` on the mux launcher sets it.",
        "NAME",
    )
    retrieval_group_pages: int = _knob(
        8,
        "Two-level retrieval: pages are also summarised in groups of N; each step the retrieval leaf scores the "
        "groups, then only the pages of its best groups (as many groups as it may pick pages), so its per-step "
        "work grows with context / (N * page size) instead of context / page size. 1: score every page (flat Quest). "
        "Drop mode (--mux-drop-cold) always scores every page.",
        "N",
    )
    retrieval_score: str = _knob(
        "mass",
        "How the retrieval leaf ranks pages from the per-head Quest bounds (max of q.k over a page's keys): 'mass' "
        "(per head, softmax of the bounds over the pages, summed over heads: the attention mass a page could get) "
        "or 'bound' (the max over heads of the raw bound, as Quest does).",
        "mass|bound",
    )
    retrieval_temperature: float = _knob(
        10.0,
        "Temperature of the 'mass' softmax: bounds are scaled by the layer's softmax scale / T. The bounds "
        "overstate the logits (each dimension's extreme over the page), so a softer softmax than attention's "
        "(T > 1) ranks better; 10 is what a sweep on the tiny model's needle tasks chose (docs/memory.md).",
        "T",
    )
    chunk_tokens: int = _knob(
        64,
        "Longest chunk of the chunk leaf, in tokens: chunks end after a sentence end or a newline in the token "
        "stream, or after this many tokens; the chunk leaf reads whole chunks.",
        "TOKENS",
    )
    chunk_layers: str = _knob(
        "per-layer",
        "Whether the chunk leaf chooses its chunks at every layer ('per-layer', from that layer's scores) or once per "
        "decode step for all layers ('shared', ChunkKV-style: from the heavy-hitter scores summed over the layers, or "
        "the first layer's query-aware scores with --mux-chunk-score quest); shared costs one chunk pass per step "
        "instead of one per layer. Per request: mux_chunk_layers.",
        "per-layer|shared",
    )
    chunk_score: str = _knob(
        "heavy",
        "What ranks the chunk leaf's chunks (by their best page): 'heavy' (the heavy-hitter scores: the prompt's "
        "observation window at prefill plus the attention paid since; the same chunks from step to step) or "
        "'quest' (the retrieval leaf's query-aware page scores of this step).",
        "heavy|quest",
    )
    layer_budget: str = _knob(
        "uniform",
        "How a routed request's pages are spread over the layers: 'uniform' (the grant at every layer), 'pyramid' "
        "(PyramidKV-style, 1.5x at the first layer down to 0.5x at the last) or 'adaptive' (from the request's "
        "prefill attention: layers whose attention is spread read more pages). Only the ranked shares (heavy, "
        "retrieval, chunk) move; their totals over the layers stay the grant's. Per request: mux_layer_budget.",
        "uniform|pyramid|adaptive",
    )
    observation_window: int = _knob(
        32, "Last prompt tokens whose attention scores heavy hitters at prefill (SnapKV-style).", "TOKENS"
    )
    router: str = _knob(
        "static",
        "The router policy (router/spine.py): 'static' (the fixed --mux-leaves split, every leaf every step), "
        "'adaptive' (the split and the layer spread follow the attention each leaf's pages got, with hysteresis; "
        "retrieval and chunk scoring run only when a trigger fires) or 'learned' (adaptive with the split chosen "
        "by a small gate trained offline, --mux-router-gate). Per request: mux_router. See docs/router.md.",
        "static|adaptive|learned",
    )
    router_interval: int = _knob(
        4, "Adaptive/learned router: decode steps between split decisions (the trigger is decided every step).", "STEPS"
    )
    router_ema: float = _knob(
        0.3, "Adaptive/learned router: weight of the newest step in the moving averages of the signals, in (0, 1].",
        "ALPHA",
    )
    router_hysteresis: float = _knob(
        0.1,
        "Adaptive/learned router: a new split is applied only when it moves at least this share of the movable pages "
        "(and at least one page) and the previous proposal pointed the same way; in [0, 1].",
        "FRACTION",
    )
    router_trigger_mass: float = _knob(
        0.2,
        "Adaptive/learned router: the query-aware leaves (retrieval, chunk) score the step's query only when the "
        "attention mass outside the sink and window pages (moving average) is at least this; other steps reuse "
        "their last pages. 0: every step (no saving); above 1: only when --mux-router-max-stale forces it.",
        "MASS",
    )
    router_max_stale: int = _knob(
        8,
        "Adaptive/learned router: the query-aware leaves score the query at least once every this many steps, "
        "whatever the trigger says; 0: only when the trigger fires.",
        "STEPS",
    )
    router_fail_mass: float = _knob(
        0.7,
        "Adaptive/learned router: a request whose out-of-window mass stays above this for --mux-router-fail-steps "
        "steps is flagged (/mux/stats router_flagged_requests) and, while the KV pool is at least a quarter free, "
        "reads --mux-router-boost x its ranked pages; in (0, 1], 1: never.",
        "MASS",
    )
    router_fail_steps: int = _knob(16, "Adaptive/learned router: steps above --mux-router-fail-mass before a request "
                                   "is flagged.", "STEPS")
    router_boost: float = _knob(
        1.5, "Adaptive/learned router: multiple of the ranked pages a flagged request reads while the pool has room "
        "(>= 1; 1: flag only).", "X"
    )
    router_gate: str = _knob(
        "",
        "Learned router: the gate file (JSON written by scripts/train_router_gate.py). Empty: the gate shipped with "
        "sglang-mux. A missing or corrupt file is an error at launch.",
        "PATH",
    )
    cold_bits: int = _knob(
        16,
        "Precision of a request's cold KV pages (those outside its hot leaves), KIVI-style: 16 keeps them exact; "
        "8, 4 or 2 quantizes them (keys per channel, values per token, asymmetric, a float16 scale and zero per "
        "group), so a cold page takes about bits/16 of its bytes (plus scales). With a host/disk tier a demoted page "
        "also keeps a quantized copy on the device, which routed decode reads instead of fetching the exact copy; "
        "with --mux-drop-cold the bytes the retrieval pages would hold exact keep quantized copies of ~2-5x as many "
        "of the best cold pages instead of dropping them (equal device bytes). Changes outputs; without tiers or "
        "drop mode it changes nothing. Per request: custom_params mux_cold_bits. See docs/memory.md, Quantized "
        "cold pages.",
        "16|8|4|2",
    )
    quant_group: int = _knob(
        32,
        "Quantization group of --mux-cold-bits (power of two in [4, 1024]): keys share a scale over this many "
        "tokens of a page (at most the page), values over this many channels of a head (at most the head dim).",
        "N",
    )
    sparse_prefill_min_tokens: int = _knob(
        0,
        "Prompts of at least this many tokens are prefilled with block-sparse attention (the sparse_prefill leaf: "
        "sinks + local window + key blocks chosen from the prompt); shorter ones, and every prompt when 0 (off), "
        "are prefilled exactly. Sparse prefill changes prompt logprobs; per request: custom_params mux_sparse_prefill.",
        "TOKENS",
    )
    sparse_prefill_block: int = _knob(
        64, "Sparse prefill block size in tokens (power of two in [8, 1024]): the unit a query block reads.", "N"
    )
    sparse_prefill_keep: float = _knob(
        0.5,
        "Share of the estimated attention mass of each query block that the chosen key blocks must hold, in (0, 1]; "
        "1 reads every causal block (exact attention, no saving).",
        "FRACTION",
    )
    sparse_prefill_sink_tokens: int = _knob(
        64, "First tokens every sparse-prefill query block reads (rounded up to whole blocks).", "TOKENS"
    )
    sparse_prefill_window_tokens: int = _knob(
        256,
        "Local window every sparse-prefill query block reads, ending at its own block (rounded up to whole blocks).",
        "TOKENS",
    )
    sparse_prefill_pattern: str = _knob(
        "vertical_slash",
        "How sparse prefill chooses key blocks: 'vertical_slash' (the key columns and diagonals the last 64 queries "
        "of each chunk attend to, MInference-style; kept needle accuracy in our measurement) or 'topk' (per query "
        "block, from pooled queries and keys, FlexPrefill-style; needs a higher keep).",
        "topk|vertical_slash",
    )
    slo_ttft: float = _knob(
        2000.0, "Time-to-first-token objective in ms: the PD placement policy and goodput count against it.", "MS"
    )
    slo_tpot: float = _knob(
        200.0, "Time-per-output-token objective in ms: the PD placement policy and goodput count against it.", "MS"
    )
    placement_costs: str = _knob(
        "",
        "Recorded deployment costs (the JSON `benchmark/goodput_pd.py --costs-only` writes). When set, `/mux/stats` "
        "carries the placement policy's prefill:decode worker recommendation for the requests this server "
        "finished recently, under the SLOs above. Empty: no recommendation.",
        "PATH",
    )
    debug_invariants: bool = _knob(
        False,
        "Verify the mux memory's invariants after every scheduler step (memory/integrity.py: demoted pages have "
        "a tier copy and no device slot, device pages free xor owned, tier bytes == their pages, staging within "
        "bounds, the pool whole when idle); a violation stops the scheduler with a message naming it. For tests "
        "and soak runs: it costs a pass over the running requests' rows and the tiers every step.",
    )
    # control plane: SLO-aware admission (serving/admission.py)
    slo_policy: str = _knob(
        "off",
        "SLO-aware admission on an aggregated server: a waiting request whose admission would make the running "
        "batch's predicted decode step (TPOT) exceed --mux-slo-tpot is 'queue'd (held in the waiting queue until "
        "the batch has room) or, with 'shrink', admitted with a smaller device-KV budget that fits (at least 1/8 "
        "of its own, else held as with 'queue'). The step time is predicted from decode steps measured online. "
        "'off': SGLang admits as usual.",
        "off|queue|shrink",
    )
    slo_prior_steps: int = _knob(
        64,
        "Weight of the --mux-placement-costs decode-step costs as a prior of the online TPOT model, in measured "
        "decode steps (0: measured steps only; large: the recorded costs dominate).",
        "STEPS",
    )

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise MuxConfigError(f"{_flag(f.name)}: expected true/false, got {v!r}")
            elif f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise MuxConfigError(f"{_flag(f.name)}: expected an integer, got {v!r}")
            elif f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise MuxConfigError(f"{_flag(f.name)}: expected a number, got {v!r}")
            elif f.type in ("str", str) and not isinstance(v, str):
                raise MuxConfigError(f"{_flag(f.name)}: expected a string, got {v!r}")
        if self.budget <= 0:
            raise MuxConfigError(f"--mux-budget: must be a positive number of tokens, got {self.budget}")
        p = self.page_size
        if p < 1 or p > 1024 or (p & (p - 1)) != 0:
            raise MuxConfigError(f"--mux-page-size: must be a power of two in [1, 1024], got {p}")
        if self.sink_tokens < -1:
            raise MuxConfigError(f"--mux-sink-tokens: must be >= 0 (or -1 for auto), got {self.sink_tokens}")
        if self.window_tokens < -1:
            raise MuxConfigError(f"--mux-window-tokens: must be >= 0 (or -1 for auto), got {self.window_tokens}")
        if self.window > self.budget:
            raise MuxConfigError(f"--mux-window-tokens: must be <= --mux-budget ({self.budget}), got {self.window}")
        if self.sink + self.window > self.budget:
            raise MuxConfigError(
                f"--mux-sink-tokens + --mux-window-tokens: must be <= --mux-budget ({self.budget}), "
                f"got {self.sink} + {self.window}"
            )
        if self.host_bytes < 0:
            raise MuxConfigError(f"--mux-host-bytes: must be >= 0, got {self.host_bytes}")
        if self.disk_bytes < 0:
            raise MuxConfigError(f"--mux-disk-bytes: must be >= 0, got {self.disk_bytes}")
        if bool(self.disk_path) != (self.disk_bytes > 0):
            raise MuxConfigError("--mux-disk-path and --mux-disk-bytes: give both (a directory and a size > 0) or neither")
        if self.remote_backend not in ("", "file", "mooncake", "hf3fs", "nixl"):
            raise MuxConfigError(
                f"--mux-remote-backend: allowed: file, mooncake, hf3fs, nixl; got {self.remote_backend!r}"
            )
        if self.remote_bytes < 0:
            raise MuxConfigError(f"--mux-remote-bytes: must be >= 0, got {self.remote_bytes}")
        if self.staging_pages < -1:
            raise MuxConfigError(f"--mux-staging-pages: must be >= 0 (or -1 for auto), got {self.staging_pages}")
        if self.missing_page not in ("wait", "skip"):
            raise MuxConfigError(f"--mux-missing-page: allowed: wait, skip; got {self.missing_page!r}")
        if self.drop_cold and self.tiered:
            raise MuxConfigError(
                "--mux-drop-cold: cannot be combined with --mux-host-bytes/--mux-disk-path (tiers keep every exact page)"
            )
        if self.retrieval_group_pages < 1 or self.retrieval_group_pages > 1024:
            raise MuxConfigError(
                f"--mux-retrieval-group-pages: must be in [1, 1024] (1: flat), got {self.retrieval_group_pages}"
            )
        if self.retrieval_score not in RETRIEVAL_SCORE_RULES:
            raise MuxConfigError(
                f"--mux-retrieval-score: allowed: {', '.join(RETRIEVAL_SCORE_RULES)}; got {self.retrieval_score!r}"
            )
        if not (0 < self.retrieval_temperature < float("inf")):
            raise MuxConfigError(
                f"--mux-retrieval-temperature: must be a positive number, got {self.retrieval_temperature!r}"
            )
        if self.layer_budget not in LAYER_BUDGET_POLICIES:
            raise MuxConfigError(
                f"--mux-layer-budget: allowed: {', '.join(LAYER_BUDGET_POLICIES)}; got {self.layer_budget!r}"
            )
        if self.chunk_layers not in CHUNK_LAYER_MODES:
            raise MuxConfigError(f"--mux-chunk-layers: allowed: {', '.join(CHUNK_LAYER_MODES)}; got {self.chunk_layers!r}")
        if self.chunk_score not in CHUNK_SCORE_RULES:
            raise MuxConfigError(f"--mux-chunk-score: allowed: {', '.join(CHUNK_SCORE_RULES)}; got {self.chunk_score!r}")
        if self.chunk_tokens < 1 or self.chunk_tokens > 1 << 20:
            raise MuxConfigError(f"--mux-chunk-tokens: must be an integer in [1, {1 << 20}], got {self.chunk_tokens}")
        if self.router not in ROUTER_POLICY_NAMES:
            raise MuxConfigError(f"--mux-router: allowed: {', '.join(ROUTER_POLICY_NAMES)}; got {self.router!r}")
        for name, lo, hi, lo_open in (("router_ema", 0.0, 1.0, True), ("router_hysteresis", 0.0, 1.0, False),
                                      ("router_fail_mass", 0.0, 1.0, True)):
            v = getattr(self, name)
            if not ((lo < v if lo_open else lo <= v) and v <= hi):
                raise MuxConfigError(f"{_flag(name)}: must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
        if not (0 <= self.router_trigger_mass < float("inf")):
            raise MuxConfigError(f"--mux-router-trigger-mass: must be >= 0, got {self.router_trigger_mass!r}")
        if not (1.0 <= self.router_boost <= 16.0):
            raise MuxConfigError(f"--mux-router-boost: must be in [1, 16], got {self.router_boost!r}")
        for name, lo in (("router_interval", 1), ("router_max_stale", 0), ("router_fail_steps", 1)):
            if not (lo <= getattr(self, name) <= 1 << 20):
                raise MuxConfigError(f"{_flag(name)}: must be an integer in [{lo}, {1 << 20}], got {getattr(self, name)}")
        if self.router_gate or self.router == "learned":
            from sglang_mux.router.gate import GateError, load_gate

            try:
                load_gate(self.router_gate or None)
            except GateError as e:
                raise MuxConfigError(f"--mux-router-gate: {e}") from None
        if self.observation_window < 1:
            raise MuxConfigError(f"--mux-observation-window: must be >= 1, got {self.observation_window}")
        if self.cold_bits not in COLD_BITS:
            raise MuxConfigError(f"--mux-cold-bits: allowed: {', '.join(map(str, COLD_BITS))}; got {self.cold_bits}")
        g = self.quant_group
        if g < 4 or g > 1024 or (g & (g - 1)) != 0:
            raise MuxConfigError(f"--mux-quant-group: must be a power of two in [4, 1024], got {g}")
        if self.sparse_prefill_min_tokens < 0:
            raise MuxConfigError(
                f"--mux-sparse-prefill-min-tokens: must be >= 0 (0: off), got {self.sparse_prefill_min_tokens}"
            )
        b = self.sparse_prefill_block
        if b < 8 or b > 1024 or (b & (b - 1)) != 0:
            raise MuxConfigError(f"--mux-sparse-prefill-block: must be a power of two in [8, 1024], got {b}")
        if not (0 < self.sparse_prefill_keep <= 1):
            raise MuxConfigError(f"--mux-sparse-prefill-keep: must be in (0, 1], got {self.sparse_prefill_keep!r}")
        for name in ("sparse_prefill_sink_tokens", "sparse_prefill_window_tokens"):
            if getattr(self, name) < 0:
                raise MuxConfigError(f"{_flag(name)}: must be >= 0, got {getattr(self, name)}")
        if self.sparse_prefill_pattern not in SPARSE_PREFILL_PATTERNS:
            raise MuxConfigError(
                f"--mux-sparse-prefill-pattern: allowed: {', '.join(SPARSE_PREFILL_PATTERNS)}; "
                f"got {self.sparse_prefill_pattern!r}"
            )
        for name in ("slo_ttft", "slo_tpot"):
            v = getattr(self, name)
            if not (0 < v < float("inf")):
                raise MuxConfigError(f"{_flag(name)}: must be a positive number of milliseconds, got {v!r}")
        if self.placement_costs:
            from sglang_mux.router.placement import PlacementError, RecordedCosts

            try:
                RecordedCosts.load(self.placement_costs)
            except PlacementError as e:
                raise MuxConfigError(f"--mux-placement-costs: {e}") from None
        # Parsing the leaf spec validates it (names, numbers, total within the budget).
        self.leaf_split(self.budget)
        # control plane
        if self.slo_policy not in ("off", "queue", "shrink"):
            raise MuxConfigError(f"--mux-slo-policy: allowed: off, queue, shrink; got {self.slo_policy!r}")
        if self.slo_policy == "shrink" and self.disable:
            raise MuxConfigError("--mux-slo-policy: 'shrink' needs mux on (--mux-disable has no budget to shrink); use queue")
        if self.slo_prior_steps < 0:
            raise MuxConfigError(f"--mux-slo-prior-steps: must be >= 0, got {self.slo_prior_steps}")

    @property
    def tiered(self) -> bool:
        """Cold pages of routed requests leave the device for the host/disk tiers."""
        return self.host_bytes > 0 or self.disk_bytes > 0 or bool(self.remote_backend)

    @property
    def staging(self) -> int:
        """Staging pages per request after resolving auto (-1)."""
        return max(self.budget // self.page_size, 1) if self.staging_pages == -1 else self.staging_pages

    @property
    def sink(self) -> int:
        """Sink tokens after resolving auto (-1)."""
        return min(64, self.budget // 8) if self.sink_tokens == -1 else self.sink_tokens

    @property
    def window(self) -> int:
        """Window tokens after resolving auto (-1)."""
        return min(512, self.budget // 4) if self.window_tokens == -1 else self.window_tokens

    # ---------------------------------------------------------------- leaf spec
    def leaf_split(self, budget: int) -> dict[str, int]:
        """Tokens per leaf for a request budget (see docs/cli.md, --mux-leaves).

        Fixed-size leaves keep their size when it fits; ``rest`` takes what is left. Worked example:
        budget 2048, spec ``sink=64,recent=512,heavy=256,retrieval=rest`` ->
        ``{sink: 64, recent: 512, heavy: 256, retrieval: 1216}``.
        """
        spec = self.leaves.strip()
        if not spec:
            heavy = budget // 8
            spec = f"sink={self.sink},recent={self.window},heavy={heavy},retrieval=rest"
        names = _leaf_names()
        out: dict[str, int] = {}
        rest_leaf = None
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise MuxConfigError(f"--mux-leaves: expected NAME=TOKENS|rest items, got {part!r}")
            name, val = (s.strip() for s in part.split("=", 1))
            if name not in names:
                raise MuxConfigError(f"--mux-leaves: unknown leaf {name!r}; allowed: {', '.join(names)}")
            if name in out or name == rest_leaf:
                raise MuxConfigError(f"--mux-leaves: leaf {name!r} given twice")
            if val == "rest":
                if rest_leaf is not None:
                    raise MuxConfigError("--mux-leaves: only one leaf may take 'rest'")
                rest_leaf = name
                continue
            try:
                n = int(val)
            except ValueError:
                raise MuxConfigError(f"--mux-leaves: {name}: expected a token count or 'rest', got {val!r}") from None
            if n < 0:
                raise MuxConfigError(f"--mux-leaves: {name}: must be >= 0, got {n}")
            out[name] = n
        used = sum(out.values())
        if used > budget:
            raise MuxConfigError(f"--mux-leaves: fixed leaves sum to {used} tokens, more than the budget {budget}")
        if rest_leaf is not None:
            out[rest_leaf] = budget - used
        return {k: out.get(k, 0) for k in names}

    # ---------------------------------------------------------------- transport
    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MuxConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MuxConfigError(f"{ENV_VAR}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise MuxConfigError(f"{ENV_VAR}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MuxConfigError(f"{ENV_VAR}: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def effective_for_server(cls, server_page_size: int) -> "MuxConfig":
        """The config inside a server whose KV pool has ``server_page_size`` (SGLang's ``--page-size``).

        Mux pages are pool pages (summaries are indexed by physical page), so the two sizes must agree. Our
        launcher sets ``--page-size`` from ``--mux-page-size``; a server started without it (plain
        ``python -m sglang.launch_server --radix-cache-backend mux``) uses the pool's page size.
        """
        server_page_size = int(server_page_size or 1)
        if ENV_VAR not in os.environ:
            return cls(page_size=server_page_size)
        cfg = cls.from_env()
        if cfg.page_size != server_page_size:
            raise MuxConfigError(
                f"--mux-page-size ({cfg.page_size}) must equal SGLang's page size ({server_page_size}): pass "
                f"--page-size {cfg.page_size} (sglang.Engine: page_size={cfg.page_size}); the mux launcher sets it"
            )
        return cfg

    @classmethod
    def from_env(cls) -> "MuxConfig":
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else cls()

    def export(self) -> None:
        """Make this the config of every process started from here on (spawned schedulers inherit env)."""
        os.environ[ENV_VAR] = self.to_env()

    def replace(self, **changes: Any) -> "MuxConfig":
        return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------- CLI
class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line naming the flag
        raise MuxConfigError(message)


def _parse_bool(flag: str):
    def conv(text: str) -> bool:
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")

    return conv


def _parse_int(flag: str):
    def conv(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None

    return conv


def _parse_float(flag: str):
    def conv(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None

    return conv


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add one ``--mux-*`` flag per MuxConfig field (bool fields are switches taking an optional value)."""
    defaults = MuxConfig()
    for f in fields(MuxConfig):
        flag = _flag(f.name)
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, dest=f.name, nargs="?", const=True, default=default, type=_parse_bool(flag), help=help_text
            )
        elif f.type in ("int", int):
            parser.add_argument(
                flag, dest=f.name, default=default, type=_parse_int(flag), metavar=f.metadata["metavar"],
                help=help_text,
            )
        elif f.type in ("float", float):
            parser.add_argument(
                flag, dest=f.name, default=default, type=_parse_float(flag), metavar=f.metadata["metavar"],
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=default, metavar=f.metadata["metavar"], help=help_text)


def cli_flags() -> list[str]:
    return [_flag(f.name) for f in fields(MuxConfig)]


def split_mux_args(argv: list[str]) -> tuple[MuxConfig, list[str]]:
    """Separate our ``--mux-*`` flags from SGLang's and build a validated MuxConfig.

    Raises MuxConfigError (one line, naming the flag and what is allowed) on unknown or bad flags.
    """
    mux_argv: list[str] = []
    rest: list[str] = []
    known = cli_flags()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--mux-"):
            name = a.split("=", 1)[0]
            if name not in known:
                raise MuxConfigError(f"unknown flag {name}; allowed --mux-* flags: {', '.join(known)}")
            mux_argv.append(a)
            # A value follows unless given inline or the flag is a bare switch.
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                mux_argv.append(argv[i + 1])
                i += 1
        else:
            rest.append(a)
        i += 1
    parser = _OneLineErrorParser(add_help=False, allow_abbrev=False)
    add_cli_args(parser)
    try:
        ns = parser.parse_args(mux_argv)
    except argparse.ArgumentTypeError as e:  # pragma: no cover - argparse wraps these into error()
        raise MuxConfigError(str(e)) from None
    return MuxConfig(**vars(ns)), rest

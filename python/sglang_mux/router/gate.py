"""The learned router's gate: a small MLP from a request's routing signals to the split of its movable pages.

File format (JSON, written by ``scripts/train_router_gate.py``; the default ships as ``router/gates/default.json``)::

    {"format": "sglang-mux-router-gate", "version": 1,
     "features": ["mass_sink", ...],            # must equal FEATURES (the order the router computes them in)
     "shares": ["recent", "heavy", "retrieval", "chunk"],   # must equal SHARES: one output logit each
     "layers": [{"w": [[...], ...], "b": [...]}, ...],      # w: [out, in]; tanh between layers, none after the last
     "trained_on": {...}}                       # free-form provenance (traces, objective, date)

Forward: ``logits = layers(features)``; the split of the movable pages is ``softmax(logits)`` over the shares
the request's static split gives pages to (the others are masked out). Pure Python: a gate is a few hundred
weights, evaluated once per request every ``--mux-router-interval`` steps.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

FORMAT = "sglang-mux-router-gate"
VERSION = 1
# What the learned router feeds the gate, in order (router/learned.py computes them):
#   mass_<bucket>   the moving average of the attention mass on that bucket's pages (buckets of router/adaptive.py)
#   out_of_hot      1 - mass_sink - mass_recent
#   frac_<share>    the share's pages / all movable pages, as in force now
#   log2_context    log2(context tokens / budget tokens)
FEATURES = ("mass_sink", "mass_recent", "mass_heavy", "mass_retrieval", "mass_chunk", "mass_other", "out_of_hot",
            "frac_recent", "frac_heavy", "frac_retrieval", "frac_chunk", "log2_context")
SHARES = ("recent", "heavy", "retrieval", "chunk")
DEFAULT_GATE = os.path.join(os.path.dirname(__file__), "gates", "default.json")


class GateError(ValueError):
    """A gate file that cannot be used; the message names the file and what is wrong (one line)."""


@dataclass(frozen=True)
class Gate:
    layers: tuple  # ((w rows, b), ...)
    path: str

    def logits(self, features: Sequence[float]) -> list[float]:
        x = list(features)
        for i, (w, b) in enumerate(self.layers):
            x = [sum(wi * xi for wi, xi in zip(row, x)) + bi for row, bi in zip(w, b)]
            if i < len(self.layers) - 1:
                x = [math.tanh(v) for v in x]
        return x

    def split(self, features: Sequence[float], allowed: Sequence[str]) -> dict[str, float]:
        """Fractions of the movable pages per share in ``allowed`` (summing to 1)."""
        logits = dict(zip(SHARES, self.logits(features)))
        z = [logits[s] for s in allowed]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        t = sum(e)
        return {s: v / t for s, v in zip(allowed, e)}


def parse_gate(obj, path: str) -> Gate:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise GateError(f"{path}: not a router gate file (expected \"format\": \"{FORMAT}\")")
    if obj.get("version") != VERSION:
        raise GateError(f"{path}: gate version {obj.get('version')!r} not supported; allowed: {VERSION}")
    if tuple(obj.get("features", ())) != FEATURES:
        raise GateError(f"{path}: features must be {list(FEATURES)}, got {obj.get('features')!r}")
    if tuple(obj.get("shares", ())) != SHARES:
        raise GateError(f"{path}: shares must be {list(SHARES)}, got {obj.get('shares')!r}")
    layers, width = [], len(FEATURES)
    raw = obj.get("layers")
    if not isinstance(raw, list) or not raw:
        raise GateError(f"{path}: 'layers' must be a non-empty list")
    for i, layer in enumerate(raw):
        w, b = (layer.get("w"), layer.get("b")) if isinstance(layer, dict) else (None, None)
        ok = (isinstance(w, list) and isinstance(b, list) and len(w) == len(b) and len(w) > 0
              and all(isinstance(r, list) and len(r) == width for r in w)
              and all(isinstance(v, (int, float)) and math.isfinite(v) for r in w for v in r)
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b))
        if not ok:
            raise GateError(f"{path}: layer {i}: expected w [out][{width}] and b [out] of finite numbers")
        layers.append((tuple(tuple(float(v) for v in r) for r in w), tuple(float(v) for v in b)))
        width = len(w)
    if width != len(SHARES):
        raise GateError(f"{path}: the last layer must have {len(SHARES)} outputs (one per share), has {width}")
    return Gate(tuple(layers), path)


@functools.lru_cache(maxsize=8)
def load_gate(path: Optional[str] = None) -> Gate:
    """The gate at ``path`` (None: the shipped default), checked; :class:`GateError` with one line otherwise."""
    path = path or DEFAULT_GATE
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise GateError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GateError(f"{path}: unreadable gate file ({type(e).__name__}: {e})") from None
    return parse_gate(obj, path)

"""Per-request mux fields through sglang-router: carried in ``custom_labels``, moved back into ``custom_params``.

sglang-router 0.3.2 parses ``/generate`` into its own typed request and serialises that to the workers (both PD
roles): ``sampling_params.custom_params`` (where a server reads the per-request ``mux_*`` fields) is not one of
its ``SamplingParams`` fields and never arrives, nor does any header but ``content-type`` and ``x-request-id``.
What it does forward unchanged is ``custom_labels``, SGLang's free string map of per-request metric labels
(measured: docs/pd.md). So a client behind the router sends

    {"text": "...", "sampling_params": {"max_new_tokens": 32},
     "custom_labels": {"mux_budget": "128", "mux_leaves": "sink=64,recent=256,retrieval=rest"}}

and every server (the edge hook of ``/generate`` and the tokenizer manager's entry, ``serving/hooks.py``) moves
the ``mux_*`` keys out of ``custom_labels`` into ``sampling_params.custom_params`` before validation, so the
scheduler, the stats and the errors are the same as for a request that sent ``custom_params`` directly. The keys
are removed from ``custom_labels`` (SGLang adds custom labels to its Prometheus labels, which only accept the
labels named at launch).

Values are strings (the router's map is string to string): ``"true"`` / ``"false"`` become booleans, a decimal
integer becomes an int, anything else stays a string; the fields and their checks are those of
``request_options.py``. A field given in both places with different values is a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from sglang_mux.request_options import KNOWN_FIELDS
from sglang_mux.serving.validation import RequestValidationError

LABELS_FIELD = "custom_labels"
_INT = re.compile(r"[+-]?\d+")


def _value(text: Any) -> Any:
    if not isinstance(text, str):
        return text  # a client that talks to a server directly may send typed values
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if _INT.fullmatch(t):
        return int(t)
    return text


def mux_fields_in_labels(labels: Any) -> dict[str, Any]:
    """The ``mux_*`` fields of a ``custom_labels`` map, typed; RequestValidationError naming an unknown one."""
    if not isinstance(labels, Mapping):
        return {}
    out = {}
    for key, text in labels.items():
        if not (isinstance(key, str) and key.startswith("mux_")):
            continue
        if key not in KNOWN_FIELDS:
            raise RequestValidationError(f"{LABELS_FIELD}.{key}", f"unknown mux field; allowed: {', '.join(KNOWN_FIELDS)}")
        out[key] = _value(text)
    return out


def _merged(sampling: Any, fields: dict[str, Any], where: str) -> dict:
    if sampling is None:
        sampling = {}
    if not isinstance(sampling, Mapping):
        return sampling  # not ours to judge: the validator names the bad sampling_params
    sp = dict(sampling)
    custom = sp.get("custom_params")
    if custom is not None and not isinstance(custom, Mapping):
        return sp  # the validator answers "custom_params: expected an object"
    merged = dict(custom or {})
    for key, v in fields.items():
        if key in merged and merged[key] != v:
            raise RequestValidationError(
                f"{LABELS_FIELD}.{key}",
                f"{v!r} conflicts with {where}.custom_params.{key} = {merged[key]!r}; give it once",
            )
        merged[key] = v
    sp["custom_params"] = merged
    return sp


def carry_label_options(obj: Any) -> int:
    """Move the ``mux_*`` keys of ``obj.custom_labels`` into ``obj.sampling_params`` (each item of a batch);
    returns how many fields moved (0: nothing to do). ``obj`` is a GenerateReqInput or anything with those two
    attributes. Raises RequestValidationError (HTTP 400) naming a bad or conflicting field."""
    labels = getattr(obj, LABELS_FIELD, None)
    fields = mux_fields_in_labels(labels)
    if not fields:
        return 0
    sampling = getattr(obj, "sampling_params", None)
    if isinstance(sampling, list):
        obj.sampling_params = [_merged(s, fields, f"sampling_params[{i}]") for i, s in enumerate(sampling)]
    else:
        obj.sampling_params = _merged(sampling, fields, "sampling_params")
    rest = {k: v for k, v in labels.items() if k not in fields}
    setattr(obj, LABELS_FIELD, rest or None)
    return len(fields)

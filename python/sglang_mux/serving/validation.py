"""Request validation rules: pure functions of plain request data and the model's limits.

Every generation request is checked here before SGLang's scheduler sees it (``hooks.py`` wires these
functions into SGLang). A rejected request raises :class:`RequestValidationError`, whose message starts
with the path of the offending field and says what is allowed, e.g.::

    input_ids[1][3]: token id 600 is outside the vocabulary [0, 512)
    sampling_params.custom_params.mux_budget: must be an integer number of tokens in [1, 16777216], got 0

Nothing here imports SGLang or touches a tensor: the functions take what a JSON body holds (dicts, lists,
numbers, strings) plus a :class:`RequestLimits`, and either return ``None`` or raise
:class:`RequestValidationError`. They never raise anything else, whatever the input (a test feeds them
random junk to hold them to that).

Three entry points, one per place a request passes:

* :func:`validate_generate_request`: a whole ``/generate`` body (or the internal request an OpenAI
  endpoint builds), before tokenization: shapes, types, ranges, token ids given as ``input_ids``.
* :func:`validate_prompt_token_ids`: the token ids of one prompt after tokenization (text, chat template).
* :func:`validate_scheduled_request`: the fields of one tokenized request as the scheduler receives it;
  the second line, re-checking everything that can crash a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from sglang_mux.request_options import MuxRequestError, parse_request_options

# Largest ``n`` (parallel samples of one prompt) we admit; OpenAI documents the same bound.
MAX_PARALLEL_SAMPLES = 128
# Largest number of sequences one request may expand into (batch items x n). Stock SGLang admits
# ``n=100000`` and then spends minutes queueing the copies, so everyone else waits.
MAX_SEQUENCES_PER_REQUEST = 4096
# SGLang's own caps on stop strings (sampling_params.MAX_STOP_COUNT); repeated so this module stays pure.
MAX_STOP_STRINGS = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The sampling_params keys a client may send (SGLang 0.5.23 SamplingParams API fields); a test checks this
# list against SGLang's class so an upgrade that adds a field is noticed.
SAMPLING_PARAM_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "beam_width",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed",
    "custom_params", "watermark",
)
# Set by SGLang's own chat endpoint on the requests it builds; accepted, not documented for clients.
INTERNAL_SAMPLING_PARAM_FIELDS = ("ebnf_full_assistant",)
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")


class RequestValidationError(ValueError):
    """A request field outside what the server accepts. ``str(e)`` is ``"<field path>: <problem>"``.

    A ``ValueError`` so that SGLang's HTTP layer already answers it with HTTP 400; ``status_code`` is read
    by SGLang's error responses.
    """

    status_code = 400

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def to_error_body(self) -> dict[str, Any]:
        """The JSON body of the HTTP 400 answer (``{"error": {...}}``, SGLang's shape plus param/type/code)."""
        return {
            "error": {
                "message": str(self),
                "type": "invalid_request_error",
                "param": self.field,
                "code": self.status_code,
            }
        }


@dataclass(frozen=True)
class RequestLimits:
    """What the served model and this server accept.

    ``vocab_size``: token ids must lie in ``[0, vocab_size)``; ``top_logprobs_num`` may be at most this.
    ``hidden_size``: length of each ``input_embeds`` vector (``None``: not checked).
    """

    vocab_size: int
    hidden_size: int | None = None
    max_parallel_samples: int = MAX_PARALLEL_SAMPLES
    max_sequences_per_request: int = MAX_SEQUENCES_PER_REQUEST


# ------------------------------------------------------------------ primitive checks
def _fail(field: str, problem: str):
    raise RequestValidationError(field, problem)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_int(field: str, v: Any, lo: int | None = None, hi: int | None = None, *, allowed: str = "") -> int:
    """``v`` must be an int (not a bool) in ``[lo, hi]``; ``allowed`` overrides the range wording."""
    ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        if not allowed:
            if lo is not None and hi is not None:
                allowed = f"an integer in [{lo}, {hi}]"
            elif lo is not None:
                allowed = f"an integer >= {lo}"
            elif hi is not None:
                allowed = f"an integer <= {hi}"
            else:
                allowed = "an integer"
        _fail(field, f"must be {allowed}, got {_show(v)}")
    return v


def check_real(field: str, v: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """``v`` must be a finite number in the interval (bounds open or closed as given)."""
    ok = _is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        _fail(field, f"must be a finite number in {interval}, got {_show(v)}")


def check_bool(field: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(field, f"must be true or false, got {_show(v)}")


def check_str(field: str, v: Any) -> None:
    if not isinstance(v, str):
        _fail(field, f"must be a string, got {_show(v)}")


def check_token_ids(field: str, ids: Any, vocab_size: int, *, allow_empty: bool = False) -> None:
    """``ids`` must be a list of ints, each in ``[0, vocab_size)``; the error names the first bad position."""
    if not isinstance(ids, (list, tuple)):
        _fail(field, f"must be a list of token ids, got {_show(ids)}")
    if not ids and not allow_empty:
        _fail(field, "must not be empty")
    for i, t in enumerate(ids):
        if not _is_int(t):
            _fail(f"{field}[{i}]", f"must be an integer token id, got {_show(t)}")
        if not 0 <= t < vocab_size:
            _fail(f"{field}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab_size})")


def _token_id_seq(v: Any) -> list | None:
    """Plain list view of a token-id container (list, tuple, array, set); ``None`` if it is not one."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=lambda t: (not _is_int(t), t if _is_int(t) else 0))
    if hasattr(v, "tolist") and callable(v.tolist):  # array('q'), numpy
        try:
            out = v.tolist()
        except Exception:  # noqa: BLE001 - a foreign container: report it as the wrong type
            return None
        return out if isinstance(out, list) else None
    return None


# ------------------------------------------------------------------ sampling_params
def _check_stop_strings(field: str, v: Any) -> None:
    if v is None or isinstance(v, str):
        return
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        _fail(field, f"must be a string or a list of strings, got {_show(v)}")
    if len(v) > MAX_STOP_STRINGS:
        _fail(field, f"at most {MAX_STOP_STRINGS} entries are allowed, got {len(v)}")


def _check_logit_bias(field: str, v: Any, vocab_size: int) -> None:
    if not isinstance(v, Mapping):
        _fail(field, f"must be an object mapping token ids to finite numbers, got {_show(v)}")
    for key, bias in v.items():
        token = key
        if isinstance(key, str):
            try:
                token = int(key)
            except ValueError:
                token = key
        if not _is_int(token) or not 0 <= token < vocab_size:
            _fail(f"{field}.{key}", f"key must be a token id in [0, {vocab_size}), got {_show(key)}")
        if not _is_real(bias):
            _fail(f"{field}.{key}", f"must be a finite number, got {_show(bias)}")


def _check_mux_fields(sampling_field: str, custom_params: Any) -> None:
    """Our per-request fields, through the one parser the scheduler also uses (request_options).

    ``sampling_field`` is the path of the enclosing sampling_params object (``sampling_params[1]``).
    """
    try:
        parse_request_options(custom_params)
    except MuxRequestError as e:
        # parse_request_options names fields as "sampling_params.custom_params.<name>"; re-root the path.
        text = str(e)
        path, _, problem = text.partition(": ")
        if path.startswith("sampling_params"):
            path = sampling_field + path[len("sampling_params") :]
        _fail(path, problem or text)


def validate_sampling_params(sp: Any, limits: RequestLimits, field: str = "sampling_params") -> None:
    """One request's ``sampling_params`` object (plain JSON), with the documented ranges of SGLang 0.5.23."""
    if sp is None:
        return
    if not isinstance(sp, Mapping):
        _fail(field, f"must be an object, got {_show(sp)}")
    for key in sp:
        if key not in SAMPLING_PARAM_FIELDS and key not in INTERNAL_SAMPLING_PARAM_FIELDS:
            _fail(f"{field}.{key}", f"unknown sampling parameter; allowed: {', '.join(SAMPLING_PARAM_FIELDS)}")
    f = lambda name: f"{field}.{name}"  # noqa: E731
    g = sp.get
    if g("max_new_tokens") is not None:
        check_int(f("max_new_tokens"), g("max_new_tokens"), 0)
    if g("min_new_tokens") is not None:
        check_int(f("min_new_tokens"), g("min_new_tokens"), 0, g("max_new_tokens"))
    if g("temperature") is not None:
        check_real(f("temperature"), g("temperature"), 0.0, math.inf, hi_open=True)
    if g("top_p") is not None:
        check_real(f("top_p"), g("top_p"), 0.0, 1.0, lo_open=True)
    if g("top_k") is not None:
        top_k = g("top_k")
        if not (_is_int(top_k) and (top_k == -1 or top_k >= 1)):
            _fail(f("top_k"), f"must be -1 (whole vocabulary) or an integer >= 1, got {_show(top_k)}")
    if g("min_p") is not None:
        check_real(f("min_p"), g("min_p"), 0.0, 1.0)
    for name in ("frequency_penalty", "presence_penalty"):
        if g(name) is not None:
            check_real(f(name), g(name), -2.0, 2.0)
    if g("repetition_penalty") is not None:
        check_real(f("repetition_penalty"), g("repetition_penalty"), 0.0, 2.0, lo_open=True)
    if g("n") is not None:
        check_int(f("n"), g("n"), 1, limits.max_parallel_samples)
    if g("beam_width") is not None:
        check_int(f("beam_width"), g("beam_width"), 1, limits.max_parallel_samples)
    _check_stop_strings(f("stop"), g("stop"))
    _check_stop_strings(f("stop_regex"), g("stop_regex"))
    if g("stop_token_ids") is not None:
        check_token_ids(f("stop_token_ids"), g("stop_token_ids"), limits.vocab_size, allow_empty=True)
    grammars = [name for name in GRAMMAR_FIELDS if g(name) not in (None, "")]
    for name in grammars:
        check_str(f(name), g(name))
    if len(grammars) > 1:
        _fail(f(grammars[1]), f"only one of {', '.join(GRAMMAR_FIELDS)} may be set (also got {grammars[0]})")
    for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                 "ebnf_full_assistant"):
        if g(name) is not None:
            check_bool(f(name), g(name))
    if g("stream_interval") is not None:
        check_int(f("stream_interval"), g("stream_interval"), 1)
    if g("logit_bias") is not None:
        _check_logit_bias(f("logit_bias"), g("logit_bias"), limits.vocab_size)
    if g("sampling_seed") is not None:
        check_int(f("sampling_seed"), g("sampling_seed"), INT64_MIN, INT64_MAX)
    if g("custom_params") is not None:
        _check_mux_fields(field, g("custom_params"))


# ------------------------------------------------------------------ whole /generate request
def _per_item(field: str, v: Any, batch: int | None, check: Callable[[str, Any], None]) -> None:
    """A field given once (applies to every item) or, for a batch, as a list with one entry per item."""
    if v is None:
        return
    if isinstance(v, list):
        if batch is None:
            _fail(field, f"a single prompt takes one value, not a list (got {_show(v)})")
        if len(v) != batch:
            _fail(field, f"has {len(v)} entries but the batch has {batch} prompts")
        for i, item in enumerate(v):
            if item is not None:
                check(f"{field}[{i}]", item)
        return
    check(field, v)


def _prompt_shape(req: Mapping[str, Any], limits: RequestLimits) -> int | None:
    """Check the prompt fields; return the batch size, or ``None`` for a single prompt."""
    given = [name for name in ("text", "input_ids", "input_embeds") if req.get(name) is not None]
    if len(given) != 1:
        _fail("text", "give exactly one of text, input_ids, input_embeds" + (f" (got {', '.join(given)})" if given else ""))
    name = given[0]
    v = req[name]
    if name == "text":
        if isinstance(v, str):
            return None
        if not isinstance(v, list) or not v:
            _fail("text", f"must be a string or a non-empty list of strings, got {_show(v)}")
        for i, t in enumerate(v):
            check_str(f"text[{i}]", t)
        return len(v)
    if name == "input_ids":
        session = req.get("session_params")
        if v == [] and isinstance(session, Mapping) and session.get("id"):
            return None  # SGLang lets a session continuation supply the whole prompt from its history
        if not isinstance(v, list) or not v:
            _fail("input_ids", f"must be a non-empty list of token ids or of lists of token ids, got {_show(v)}")
        if all(isinstance(x, list) for x in v):
            for i, ids in enumerate(v):
                check_token_ids(f"input_ids[{i}]", ids, limits.vocab_size)
            return len(v)
        check_token_ids("input_ids", v, limits.vocab_size)
        return None
    # input_embeds: [tokens][hidden] for one prompt, [prompts][tokens][hidden] for a batch.
    if not isinstance(v, list) or not v:
        _fail("input_embeds", f"must be a non-empty list of embedding vectors, got {_show(v)}")
    single = isinstance(v[0], list) and bool(v[0]) and not isinstance(v[0][0], list)
    prompts = [v] if single else v
    for p, rows in enumerate(prompts):
        pf = "input_embeds" if single else f"input_embeds[{p}]"
        if not isinstance(rows, list) or not rows:
            _fail(pf, f"must be a non-empty list of embedding vectors, got {_show(rows)}")
        for r, row in enumerate(rows):
            if not isinstance(row, list) or not row or not all(_is_real(x) for x in row):
                _fail(f"{pf}[{r}]", "must be a non-empty list of finite numbers")
            if limits.hidden_size is not None and len(row) != limits.hidden_size:
                _fail(f"{pf}[{r}]", f"must have the model's hidden size {limits.hidden_size} numbers, got {len(row)}")
    return None if single else len(prompts)


def validate_generate_request(req: Mapping[str, Any], limits: RequestLimits) -> None:
    """A ``/generate`` request as sent (before SGLang normalizes it); raises on the first bad field.

    Checks: exactly one prompt field and its shape; token ids in ``[0, vocab_size)`` (``input_ids``,
    ``token_ids_logprob``, ``stop_token_ids``, ``logit_bias``); logprob fields (``logprob_start_len >= -1``,
    ``0 <= top_logprobs_num <= vocab_size``); per-item lists match the batch size (``sampling_params``,
    ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``, ``token_ids_logprob``, ``rid``); every
    sampling parameter in its range; ``n`` and batch x n bounded; our ``mux_*`` fields.
    """
    if not isinstance(req, Mapping):
        _fail("body", f"must be a JSON object, got {_show(req)}")
    batch = _prompt_shape(req, limits)
    items = 1 if batch is None else batch

    sp = req.get("sampling_params")
    if isinstance(sp, list):
        if batch is None:
            _fail("sampling_params", "a single prompt takes one sampling_params object, not a list")
        if len(sp) != batch:
            _fail("sampling_params", f"has {len(sp)} entries but the batch has {batch} prompts")
        for i, one in enumerate(sp):
            if not isinstance(one, Mapping):
                _fail(f"sampling_params[{i}]", f"must be an object, got {_show(one)}")
            validate_sampling_params(one, limits, f"sampling_params[{i}]")
        ns = {one.get("n", 1) for one in sp} - {None}
        if len(ns) > 1:
            _fail("sampling_params", f"every entry must have the same n, got {sorted(ns)}")
        n = ns.pop() if ns else 1
    else:
        validate_sampling_params(sp, limits)
        n = (sp or {}).get("n") or 1
    if items * n > limits.max_sequences_per_request:
        _fail(
            "sampling_params.n",
            f"{items} prompts x n={n} = {items * n} sequences; at most {limits.max_sequences_per_request} per request",
        )

    vocab = limits.vocab_size
    _per_item("return_logprob", req.get("return_logprob"), batch, check_bool)
    _per_item("logprob_start_len", req.get("logprob_start_len"), batch,
              lambda f, v: check_int(f, v, -1, allowed="-1 (output tokens only) or a prompt position >= 0"))
    _per_item("top_logprobs_num", req.get("top_logprobs_num"), batch, lambda f, v: check_int(f, v, 0, vocab))
    _per_item("rid", req.get("rid"), batch, check_str)
    if n > 1:
        for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
            if isinstance(req.get(name), list):
                _fail(name, "a per-prompt list cannot be combined with n > 1; give one value")

    tl = req.get("token_ids_logprob")
    if tl is not None:
        if isinstance(tl, list) and tl and all(isinstance(x, list) for x in tl):
            if batch is None:
                _fail("token_ids_logprob", "a single prompt takes one flat list of token ids")
            if len(tl) != batch:
                _fail("token_ids_logprob", f"has {len(tl)} lists but the batch has {batch} prompts")
            for i, ids in enumerate(tl):
                check_token_ids(f"token_ids_logprob[{i}]", ids, vocab, allow_empty=True)
        else:
            check_token_ids("token_ids_logprob", tl, vocab, allow_empty=True)

    for name in ("stream", "return_text_in_logprobs"):
        if req.get(name) is not None:
            check_bool(name, req[name])


def validate_prompt_token_ids(field: str, input_ids: Any, vocab_size: int, *, allow_empty: bool = False) -> None:
    """Token ids of one tokenized prompt (from text, a chat template, or given): at least one (a 0-token
    prompt crashes the forward pass; ``text: ""`` tokenizes to that with a tokenizer that adds no BOS),
    each in ``[0, vocab_size)``.

    ``input_ids`` may be ``None`` (embeddings-only prompt: nothing to check). ``allow_empty``: a session
    continuation, whose prompt the session history supplies.
    """
    if input_ids is None:
        return
    ids = _token_id_seq(input_ids)
    if ids is None:
        _fail(field, f"must be a list of token ids, got {_show(input_ids)}")
    if not ids and not allow_empty:
        _fail(field, "the prompt has no tokens; give at least one token")
    check_token_ids(field, ids, vocab_size, allow_empty=True)


def validate_scheduled_request(fields: Mapping[str, Any], limits: RequestLimits) -> None:
    """One tokenized request as the scheduler receives it: the fields that reach tensors.

    ``fields`` keys (missing ones are skipped): ``input_ids`` (list or array of ints), ``session`` (true for a
    session continuation: an empty ``input_ids`` is then allowed), ``return_logprob``,
    ``logprob_start_len``, ``top_logprobs_num``, ``token_ids_logprob``, and the sampling values
    ``stop_token_ids`` (set or list), ``logit_bias``, ``top_k``, ``n``, ``stream_interval``, ``custom_params``.
    SGLang has already filled defaults here (e.g. ``top_k`` is 1<<30 for "whole vocabulary").
    """
    vocab = limits.vocab_size
    g = fields.get
    validate_prompt_token_ids("input_ids", g("input_ids"), vocab, allow_empty=bool(g("session")))
    if g("logprob_start_len") is not None:
        check_int("logprob_start_len", g("logprob_start_len"), -1,
                  allowed="-1 (output tokens only) or a prompt position >= 0")
    if g("top_logprobs_num") is not None:
        check_int("top_logprobs_num", g("top_logprobs_num"), 0, vocab)
    if g("token_ids_logprob") is not None:
        validate_prompt_token_ids("token_ids_logprob", g("token_ids_logprob"), vocab)
    if g("stop_token_ids") is not None:
        validate_prompt_token_ids("sampling_params.stop_token_ids", g("stop_token_ids"), vocab)
    if g("logit_bias") is not None:
        _check_logit_bias("sampling_params.logit_bias", g("logit_bias"), vocab)
    if g("top_k") is not None:
        top_k = g("top_k")
        if not (_is_int(top_k) and (top_k == -1 or top_k >= 1)):
            _fail("sampling_params.top_k", f"must be -1 (whole vocabulary) or an integer >= 1, got {_show(top_k)}")
    if g("n") is not None:
        check_int("sampling_params.n", g("n"), 1, limits.max_parallel_samples)
    if g("stream_interval") is not None:
        check_int("sampling_params.stream_interval", g("stream_interval"), 1)
    if g("custom_params") is not None:
        _check_mux_fields("sampling_params", g("custom_params"))


# ------------------------------------------------------------------ OpenAI field names
# The OpenAI endpoints build an internal /generate request; errors found in it are reported with the
# name the client used. Longest matching prefix wins.
_OPENAI_COMMON = {
    "sampling_params.max_new_tokens": "max_tokens",
    "sampling_params.min_new_tokens": "min_tokens",
    "sampling_params.sampling_seed": "seed",
    "sampling_params.custom_params": "custom_params",
    "sampling_params": "",
    "return_logprob": "logprobs",
}
OPENAI_COMPLETION_NAMES = {**_OPENAI_COMMON, "input_ids": "prompt", "text": "prompt", "top_logprobs_num": "logprobs"}
OPENAI_CHAT_NAMES = {**_OPENAI_COMMON, "input_ids": "messages", "text": "messages", "top_logprobs_num": "top_logprobs"}


def rename_field(path: str, names: Mapping[str, str]) -> str:
    """Map an internal field path to the client's name: ``sampling_params.top_k`` -> ``top_k``."""
    for internal in sorted(names, key=len, reverse=True):
        if path == internal or path.startswith(internal + ".") or path.startswith(internal + "["):
            public = names[internal]
            rest = path[len(internal) :]
            if not public:
                return rest.lstrip(".") or path
            return public + rest
    return path


def as_public_error(e: RequestValidationError, names: Mapping[str, str]) -> RequestValidationError:
    """The same error, with its field renamed for an API whose field names differ (see ``rename_field``)."""
    return RequestValidationError(rename_field(e.field, names), e.problem)


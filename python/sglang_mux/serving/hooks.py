"""Wire request validation (``validation.py``) into SGLang 0.5.23, through ``HookRegistry`` only.

:func:`install_request_validation` is called from the plugin's ``register()``, so it runs in every SGLang
process, with mux on or off (``--mux-disable`` still loads the plugin). It patches five places (``/generate``,
the two OpenAI endpoints, the tokenizer manager's entry and its per-prompt check, the scheduler's admission),
listed with their reasons in the table of ``sglang_hooks.py`` (groups ``validation-edge``, ``validation-tokenizer``,
``validation-scheduler``); each hook's docstring below says why it sits where it does.

Rejections are HTTP 400 with ``{"error": {"message": "<field>: <problem>", "type": "invalid_request_error",
"param": "<field>", "code": 400}}`` (OpenAI endpoints: SGLang's OpenAI error object, same message).

``SGLANG_MUX_VALIDATION_LAYERS`` (comma list of ``edge``, ``tokenizer``, ``scheduler``; default all) turns
layers off, so tests can show the scheduler line holds on its own. ``SGLANG_MUX_FAULT_RID_PREFIX`` makes
the scheduler guard raise for requests whose rid starts with it (fault injection for tests; unset in
production).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import sys
from http import HTTPStatus
from typing import Any, Mapping

from sglang_mux.serving.label_options import carry_label_options
from sglang_mux.serving.validation import (
    OPENAI_CHAT_NAMES,
    OPENAI_COMPLETION_NAMES,
    RequestLimits,
    RequestValidationError,
    as_public_error,
    validate_generate_request,
    validate_prompt_token_ids,
    validate_scheduled_request,
)
from sglang_mux.sglang_hooks import (
    HTTP_GENERATE,
    OPENAI_CHAT,
    OPENAI_COMPLETION,
    SCHEDULER,
    TOKENIZER_MANAGER,
    SGLangHook,
    hooks_in,
    register_hooks,
)

logger = logging.getLogger(__name__)

LAYERS_ENV = "SGLANG_MUX_VALIDATION_LAYERS"
FAULT_ENV = "SGLANG_MUX_FAULT_RID_PREFIX"
ALL_LAYERS = ("edge", "tokenizer", "scheduler")

TOKENIZER_ENTRY = f"{TOKENIZER_MANAGER}.generate_request"
TOKENIZED_PROMPT = f"{TOKENIZER_MANAGER}._validate_one_request"
SCHEDULER_ENTRY = f"{SCHEDULER}.handle_generate_request"

_installed = False


def enabled_layers() -> tuple[str, ...]:
    """Layers named in ``SGLANG_MUX_VALIDATION_LAYERS`` (all when unset); unknown names are an error."""
    text = os.environ.get(LAYERS_ENV, "").strip()
    if not text:
        return ALL_LAYERS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in ALL_LAYERS]
    if bad:
        raise ValueError(f"{LAYERS_ENV}: unknown layer {bad[0]!r}; allowed: {', '.join(ALL_LAYERS)}")
    return names


# ------------------------------------------------------------------ helpers
def _limits(model_config: Any) -> RequestLimits | None:
    vocab = getattr(model_config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    hidden = getattr(model_config, "hidden_size", None)
    return RequestLimits(vocab_size=vocab, hidden_size=hidden if isinstance(hidden, int) else None)


def _request_fields(obj: Any) -> dict[str, Any]:
    """A GenerateReqInput (a dataclass) as the plain mapping the rules read."""
    return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}


def _is_generate_input(obj: Any) -> bool:
    from sglang.srt.managers.io_struct import GenerateReqInput

    return isinstance(obj, GenerateReqInput)


async def _fail_on_first_item(error: Exception):
    """An async generator that raises ``error`` when first iterated (what callers of generate_request expect)."""
    raise error
    yield  # pragma: no cover - makes this an async generator


# ------------------------------------------------------------------ HTTP edge: /generate
async def reject_invalid_generate(original, obj, request, *args, **kwargs):
    """AROUND ``serve_generate_request``: answer HTTP 400 before SGLang starts a response.

    Why here: for ``stream: true`` SGLang calls the tokenizer manager inside the streaming body, after
    the 200 status line went out, so a rejection there can only be an SSE error event.
    """
    from fastapi.responses import ORJSONResponse
    from sglang.srt.entrypoints import http_server

    state = http_server.get_global_state()
    limits = _limits(getattr(getattr(state, "tokenizer_manager", None), "model_config", None))
    try:
        carry_label_options(obj)  # mux fields sent through sglang-router (label_options.py)
        if limits is not None:
            validate_generate_request(_request_fields(obj), limits)
    except RequestValidationError as e:
        logger.info("rejected /generate request: %s", e)
        return ORJSONResponse(status_code=e.status_code, content=e.to_error_body())
    return await original(obj, request, *args, **kwargs)


# ------------------------------------------------------------------ OpenAI endpoints
def _openai_check(names: Mapping[str, str]):
    def check_converted_request(result, self, *args, **kwargs):
        """AFTER ``_convert_to_internal_request``: validate the internal request the endpoint built.

        Why here: it runs before SGLang splits streaming from non-streaming, inside the handler that turns
        a ValueError into HTTP 400; errors are renamed to the OpenAI field names (``top_logprobs``, ``n``).
        """
        adapted = result[0] if isinstance(result, tuple) and result else result
        limits = _limits(getattr(self.tokenizer_manager, "model_config", None))
        if limits is None or not _is_generate_input(adapted):
            return None
        try:
            validate_generate_request(_request_fields(adapted), limits)
        except RequestValidationError as e:
            raise as_public_error(e, names) from None
        return None

    return check_converted_request


check_completion_request = _openai_check(OPENAI_COMPLETION_NAMES)
check_chat_request = _openai_check(OPENAI_CHAT_NAMES)


# ------------------------------------------------------------------ tokenizer manager
def validate_at_tokenizer_entry(original, self, obj, *args, **kwargs):
    """AROUND ``TokenizerManager.generate_request``: the one gate every generation request passes.

    Why here: HTTP routes, OpenAI endpoints and ``sglang.Engine`` all call it, before SGLang normalizes
    the request (so the batch/``sampling_params`` shapes are still the client's).
    """
    if _is_generate_input(obj):
        limits = _limits(getattr(self, "model_config", None))
        try:
            carry_label_options(obj)  # mux fields sent through sglang-router (label_options.py)
            if limits is not None:
                validate_generate_request(_request_fields(obj), limits)
        except RequestValidationError as e:
            return _fail_on_first_item(e)
    return original(self, obj, *args, **kwargs)


def validate_tokenized_prompt(result, self, obj, input_ids=None, *args, **kwargs):
    """AFTER ``TokenizerManager._validate_one_request``: the prompt has tokens, all in the vocabulary.

    Why here: it runs once per prompt, right after tokenization, for single and batch requests; a tokenizer
    whose added tokens lie beyond the model's embedding table would otherwise crash the forward pass.
    """
    if not _is_generate_input(obj):
        return None
    limits = _limits(getattr(self, "model_config", None))
    if limits is not None:
        field = "input_ids" if getattr(obj, "input_ids", None) is not None else "text"
        session = bool(getattr(obj, "session_params", None))
        validate_prompt_token_ids(field, input_ids, limits.vocab_size, allow_empty=session)
    return None


# ------------------------------------------------------------------ scheduler: the second line
def _scheduled_fields(recv_req: Any) -> dict[str, Any]:
    sp = getattr(recv_req, "sampling_params", None)
    return {
        "input_ids": getattr(recv_req, "input_ids", None),
        "session": getattr(recv_req, "session_params", None) is not None,
        "logprob_start_len": getattr(recv_req, "logprob_start_len", None),
        "top_logprobs_num": getattr(recv_req, "top_logprobs_num", None),
        "token_ids_logprob": getattr(recv_req, "token_ids_logprob", None),
        "stop_token_ids": getattr(sp, "stop_token_ids", None),
        "logit_bias": getattr(sp, "logit_bias", None),
        "top_k": getattr(sp, "top_k", None),
        "n": getattr(sp, "n", None),
        "stream_interval": getattr(sp, "stream_interval", None),
        "custom_params": getattr(sp, "custom_params", None),
    }


def _abort_unadmitted(scheduler: Any, recv_req: Any, message: str, status_code: int) -> None:
    """Finish ``recv_req`` with an error to its client without it entering a batch.

    Uses SGLang's own path for requests the scheduler ends outside the output stream
    (``send_abort_output`` with an ``AbortReq`` carrying ``finished_reason``); the tokenizer manager turns
    it into HTTP 400/500 (non-stream) or a final chunk with that finish reason (stream).
    """
    from sglang.srt.managers.io_struct import AbortReq

    abort = AbortReq(
        rid=recv_req.rid,
        # HTTPStatus, not int: SGLang's OpenAI streaming path only reports aborts whose code is an HTTPStatus.
        finished_reason={"type": "abort", "status_code": HTTPStatus(status_code), "message": message},
    )
    scheduler.send_abort_output(abort, recv_req)


def _drop_queued(scheduler: Any, rid: str) -> None:
    """Remove a half-admitted request from the waiting queue (admission may fail after it was queued)."""
    queue = getattr(scheduler, "waiting_queue", None)
    if isinstance(queue, list):
        queue[:] = [r for r in queue if getattr(r, "rid", None) != rid]


def guard_scheduler_request(original, self, recv_req, *args, **kwargs):
    """AROUND ``Scheduler.handle_generate_request``: nothing one request carries may stop the scheduler.

    1. Re-check the fields that reach tensors (token ids, logprob numbers, mux fields): a bad one is
       aborted with HTTP 400 naming the field, even if the request bypassed the front layers.
    2. Any exception while SGLang admits the request aborts just that request (HTTP 500, logged once with
       its rid); the scheduler loop keeps serving everyone else.
    """
    rid = getattr(recv_req, "rid", None)
    model_config = getattr(self, "model_config", None)
    limits = _limits(model_config)
    if limits is not None and "scheduler" in enabled_layers():
        try:
            validate_scheduled_request(_scheduled_fields(recv_req), limits)
        except RequestValidationError as e:
            logger.info("request %s rejected by the scheduler guard: %s", rid, e)
            _abort_unadmitted(self, recv_req, str(e), e.status_code)
            return None
    try:
        out = original(self, recv_req, *args, **kwargs)
        fault = os.environ.get(FAULT_ENV)
        if fault and isinstance(rid, str) and rid.startswith(fault):
            raise RuntimeError(f"injected fault for request {rid} ({FAULT_ENV})")
        return out
    except Exception as exc:  # noqa: BLE001 - the point: one request's failure must not end the loop
        logger.error("request %s failed while being admitted; aborted it, still serving: %r", rid, exc, exc_info=True)
        try:
            _drop_queued(self, rid)
            _abort_unadmitted(self, recv_req, f"internal error while admitting request {rid}: {exc!r}", 500)
        except Exception:  # noqa: BLE001
            logger.error("request %s: could not send its abort", rid, exc_info=True)
        return None


# ------------------------------------------------------------------ installation
def _module_of(target: str) -> str:
    parts = target.split(".")
    # module path = the leading lowercase components (classes and functions follow)
    for i, p in enumerate(parts):
        if p[:1].isupper():
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def install_request_validation() -> list[SGLangHook]:
    """Register the validation hooks with SGLang's ``HookRegistry`` (idempotent); returns those registered.

    In the launcher / Engine process every hook is registered; in a spawned child (scheduler,
    detokenizer) only those whose SGLang module the child already imported, so a detokenizer does not
    import the scheduler. ``plugin.register`` (or ``load_plugins``) applies them.
    """
    global _installed
    if _installed:
        return []
    layers = enabled_layers()
    records = [h for layer in ("edge", "tokenizer") if layer in layers for h in hooks_in(f"validation-{layer}")]
    # The scheduler guard is always installed: its exception catch is not optional; the "scheduler"
    # layer switch only governs its re-validation step.
    records += hooks_in("validation-scheduler")

    main_process = multiprocessing.parent_process() is None
    done = register_hooks(h for h in records if main_process or _module_of(h.target) in sys.modules)
    _installed = True
    return done

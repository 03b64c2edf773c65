"""Every SGLang hook sglang-mux installs, in one table: the installers read it, the plugin checks it at startup.

SGLang's ``HookRegistry`` logs a hook it cannot apply and carries on, so a target that an SGLang upgrade renamed
would quietly switch a feature off. Here that is a one-line error naming the target instead:

* :func:`check_installed` (called by ``plugin.register``): each installed target exists in the running SGLang
  and our hook is in its live wrapper chain (or, inside SGLang's ``load_plugins``, which applies every plugin's
  hooks after the last one registered, that it is not patched yet, since ``HookRegistry`` skips a target it
  already patched);
* test/test_hooks_table.py (the upgrade tripwire) resolves every target of the table against the installed SGLang;
* docs/architecture.md ("SGLang hooks") shows the table as :func:`markdown_table` renders it (a test compares them).

Importing this module does not import SGLang.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable

# HookRegistry kinds, and the two ways we change SGLang outside it
REGISTRY_KINDS = ("BEFORE", "AFTER", "AROUND")
ROUTE = "ROUTE"  # an HTTP route added to SGLang's FastAPI app
SETATTR = "SETATTR"  # a class attribute set at run time by another hook (not installed at startup)

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
OUTPUT_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
HTTP_SERVER = "sglang.srt.entrypoints.http_server"
HTTP_GENERATE = f"{HTTP_SERVER}.serve_generate_request"
OPENAI_COMPLETION = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._convert_to_internal_request"
OPENAI_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
METADATA_BUFFERS = "sglang.srt.disaggregation.utils.MetadataBuffers"
DECODE_TRANSFER_QUEUE = "sglang.srt.disaggregation.decode.DecodeTransferQueue"
REQ = "sglang.srt.managers.schedule_batch.Req"


@dataclass(frozen=True)
class SGLangHook:
    target: str  # dotted path in SGLang 0.5.23: module.function or module.Class.attribute
    kind: str  # BEFORE / AFTER / AROUND (HookRegistry), ROUTE or SETATTR
    hook: str  # our side, "module:function"
    group: str  # which installer registers it, and where (see the installers)
    why: str
    breaks: str  # what stops working, and how it shows, if SGLang renames or changes the target


HOOKS: tuple[SGLangHook, ...] = (
    # router/hooks.py: every SGLang process
    SGLangHook(f"{SCHEDULER}.handle_generate_request", "BEFORE", "sglang_mux.router.hooks:admit_request", "router",
               "record the request's mux options (custom_params) before it can be scheduled",
               "per-request mux_budget / mux_leaves / mux_exact ignored: the server's settings for everyone"),
    SGLangHook(f"{REQ}.reset_for_retract", "AFTER", "sglang_mux.router.hooks:readmit_retracted_request", "router",
               "a retracted request (KV released, queued again) gets its mux options back for its new prefill",
               "a retracted request is re-served with the server's budget and leaves, not its own"),
    SGLangHook(f"{SCHEDULER}.get_internal_state", "AFTER", "sglang_mux.router.hooks:add_mux_stats", "router",
               "add the mux stats to the scheduler's internal state (/server_info, /mux/stats)",
               "/mux/stats answers 404; benchmarks lose the memory decomposition"),
    SGLangHook(f"{SCHEDULER}.process_batch_result", "BEFORE", "sglang_mux.router.hooks:abort_failed_requests",
               "router", "finish a request whose memory failed it (bad lower-tier page) with an error",
               "such a request keeps decoding over missing pages instead of failing with HTTP 500"),
    SGLangHook(f"{SCHEDULER}.get_next_batch_to_run", "BEFORE", "sglang_mux.router.hooks:reopen_batch_after_freeing",
               "router", "let the scheduler admit waiting requests after mux gave device slots back",
               "slots freed by drop / tier modes stay unused until a request finishes: fewer concurrent requests"),
    SGLangHook(f"{OUTPUT_STREAMER}.stream_output", "AFTER", "sglang_mux.router.hooks:after_stream_output", "router",
               "drop the state of requests that finished without KV; feed the placement window",
               "the state of aborted requests leaks; the placement recommendation stays empty"),
    # prometheus_metrics.py, registered with the router group (every scheduler)
    SGLangHook(f"{SCHEDULER}.process_batch_result", "AFTER", "sglang_mux.prometheus_metrics:export_after_batch",
               "router", "--enable-metrics: copy the mux stats into Prometheus metrics after each batch (/metrics)",
               "/metrics carries no sglang_mux_* metrics (or stale values); serving is unaffected"),
    # memory/integrity.py, registered with the router group (every scheduler); does nothing unless the flag is on
    SGLangHook(f"{SCHEDULER}.process_batch_result", "AFTER", "sglang_mux.memory.integrity:check_after_batch",
               "router", "--mux-debug-invariants: verify the mux memory's invariants after every scheduler step",
               "the invariants are not checked (serving is unaffected; tests and soak runs lose their tripwire)"),
    # serving/admission.py, registered with the router group (every scheduler); does nothing with --mux-slo-policy off
    SGLangHook(f"{SCHEDULER}.get_new_batch_prefill", "AROUND", "sglang_mux.serving.admission:admit_by_slo", "router",
               "--mux-slo-policy: show SGLang only the waiting requests whose admission keeps the predicted TPOT "
               "within --mux-slo-tpot (shrinking budgets first with 'shrink'); hold the rest",
               "requests are admitted as SGLang alone decides: the running batch's TPOT may break the SLO"),
    SGLangHook(f"{SCHEDULER}.process_batch_result", "BEFORE", "sglang_mux.serving.admission:observe_step", "router",
               "time each decode step (batch size, KV read) for the online TPOT model of the SLO admission",
               "the TPOT model stays at its prior (or predicts nothing): admission decisions on stale costs"),
    # router/http_routes.py: the launcher's main process (the HTTP server)
    SGLangHook(f"{HTTP_SERVER}.app", ROUTE, "sglang_mux.router.http_routes:mux_stats", "stats-route",
               "GET /mux/stats: the mux section of every scheduler's internal state",
               "/mux/stats is missing; it also reads http_server._global_state.tokenizer_manager"),
    # serving/hooks.py: request validation, one group per layer (SGLANG_MUX_VALIDATION_LAYERS)
    SGLangHook(HTTP_GENERATE, "AROUND", "sglang_mux.serving.hooks:reject_invalid_generate", "validation-edge",
               "/generate: HTTP 400 before a stream starts (not an SSE error event)",
               "bad /generate requests are caught one layer later (tokenizer), streamed ones as an SSE event"),
    SGLangHook(OPENAI_COMPLETION, "AFTER", "sglang_mux.serving.hooks:check_completion_request", "validation-edge",
               "/v1/completions: check the request the endpoint built, name the client's fields",
               "errors name SGLang's internal fields instead of the OpenAI ones"),
    SGLangHook(OPENAI_CHAT, "AFTER", "sglang_mux.serving.hooks:check_chat_request", "validation-edge",
               "/v1/chat/completions: check the request the endpoint built, name the client's fields",
               "errors name SGLang's internal fields instead of the OpenAI ones"),
    SGLangHook(f"{TOKENIZER_MANAGER}.generate_request", "AROUND", "sglang_mux.serving.hooks:validate_at_tokenizer_entry",
               "validation-tokenizer", "the one gate every generation request passes (HTTP, OpenAI, Engine)",
               "sglang.Engine requests are checked only by the scheduler guard"),
    SGLangHook(f"{TOKENIZER_MANAGER}._validate_one_request", "AFTER",
               "sglang_mux.serving.hooks:validate_tokenized_prompt", "validation-tokenizer",
               "token ids produced by tokenization / chat templates lie in the vocabulary",
               "an out-of-vocabulary token id reaches the forward pass"),
    SGLangHook(f"{SCHEDULER}.handle_generate_request", "AROUND", "sglang_mux.serving.hooks:guard_scheduler_request",
               "validation-scheduler", "second line: a request that fails admission is aborted, the scheduler goes on",
               "one malformed request can stop the scheduler loop (the whole server)"),
    # disagg/hooks.py: PD
    SGLangHook(HTTP_GENERATE, "AROUND", "sglang_mux.disagg.hooks:reject_malformed_bootstrap", "pd-bootstrap",
               "PD servers: HTTP 400 for malformed or missing bootstrap fields",
               "a bad bootstrap field reaches the transfer engine (hung or failed request)"),
    SGLangHook(f"{METADATA_BUFFERS}.__init__", "AFTER", "sglang_mux.disagg.heavy_scores:add_heavy_score_buffer",
               "pd-heavy-scores", "allocate the heavy-score buffer next to SGLang's PD metadata buffers",
               "the decode side's heavy leaf gets no prefill scores (worse routed quality in PD)"),
    SGLangHook(f"{METADATA_BUFFERS}.get_buf_infos", "AFTER",
               "sglang_mux.disagg.heavy_scores:register_heavy_score_buffer", "pd-heavy-scores",
               "register that buffer with the transfer engine (appended last)",
               "the scores do not cross; a change of buffer pairing could corrupt the metadata transfer"),
    SGLangHook(f"{METADATA_BUFFERS}.set_buf", "AFTER", "sglang_mux.disagg.heavy_scores:write_heavy_scores",
               "pd-heavy-scores", "prefill: write the request's heavy-hitter scores into its slot",
               "the decode side receives empty scores"),
    SGLangHook(f"{DECODE_TRANSFER_QUEUE}._commit_transfer_to_req", "BEFORE",
               "sglang_mux.disagg.heavy_scores:read_heavy_scores", "pd-heavy-scores",
               "decode: copy the received scores out before the slot is reused",
               "the decode side never reads the scores"),
    SGLangHook(f"{SCHEDULER}.init_disaggregation", "BEFORE", "sglang_mux.platform.cpu_pd:_before_init_disaggregation",
               "pd-cpu", "no GPU: turn off Mooncake's pinned host-tensor indices in a PD prefill scheduler",
               "PD prefill without a GPU fails in Mooncake's CUDA event path"),
    SGLangHook("sglang.srt.disaggregation.mooncake.conn.MooncakeKVSender.supports_host_tensor_indices", SETATTR,
               "sglang_mux.platform.cpu_pd:disable_mooncake_host_tensor_indices", "pd-cpu-runtime",
               "set to False by the pd-cpu hook above, in a PD prefill scheduler without a GPU",
               "setting a renamed attribute does nothing: PD prefill without a GPU fails as above"),
)


class HookCheckError(RuntimeError):
    """An SGLang hook target is missing, or a hook was not applied (one line, naming the target)."""


def hooks_in(group: str) -> tuple[SGLangHook, ...]:
    found = tuple(h for h in HOOKS if h.group == group)
    if not found:
        raise KeyError(f"no SGLang hooks in group {group!r}")
    return found


def hook_function(record: SGLangHook) -> Callable:
    module, _, name = record.hook.partition(":")
    return getattr(importlib.import_module(module), name)


def register_hooks(records: Iterable[SGLangHook]) -> list[SGLangHook]:
    """Register HookRegistry hooks (not applied: see ``plugin.register``); returns the records registered."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    done = []
    for record in records:
        if record.kind not in REGISTRY_KINDS:
            raise ValueError(f"{record.target}: {record.kind} is not a HookRegistry kind")
        HookRegistry.register(record.target, hook_function(record), HookType[record.kind])
        done.append(record)
    return done


def resolve_target(target: str):
    """The live SGLang object at ``target``; HookCheckError if the module or an attribute is missing."""
    try:
        return pkgutil.resolve_name(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise HookCheckError(
            f"sglang-mux: SGLang hook target {target} not found ({type(e).__name__}: {e}); "
            f"sglang-mux supports sglang==0.5.23 only"
        ) from None


def hook_reaches(live, hook: Callable) -> bool:
    """True when ``hook`` is one of the wrappers HookRegistry chained in front of ``live``'s original (each wrapper
    holds its hook in its closure and the next function in ``__wrapped__``)."""
    fn, seen = live, 0
    while fn is not None and seen < 64:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                if cell.cell_contents is hook:
                    return True
            except ValueError:  # an empty cell
                continue
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return False


def _route_added(app, endpoint: Callable) -> bool:
    return any(getattr(r, "endpoint", None) is endpoint for r in app.router.routes)


def check_installed(records: Iterable[SGLangHook], *, applied: bool) -> None:
    """Raise HookCheckError naming the first installed hook that is missing or will not take effect.

    ``applied``: HookRegistry already applied the hooks (``plugin.register`` outside ``load_plugins``), so each
    hook must be in its target's live wrapper chain. Otherwise ``load_plugins`` applies them right after every
    plugin registered, and a target it already patched would be skipped: none may be patched yet.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry

    for record in records:
        live = resolve_target(record.target)
        fn = hook_function(record)
        if record.kind == ROUTE:
            ok = _route_added(live, fn)
        elif applied:
            ok = hook_reaches(live, fn)
        else:
            ok = record.target not in HookRegistry._patched
        if not ok:
            raise HookCheckError(
                f"sglang-mux: {record.kind} hook {record.hook} on SGLang target {record.target} did not take effect "
                f"(see HookRegistry's log above)"
            )


def markdown_table() -> str:
    """The table as docs/architecture.md shows it."""
    rows = ["| target (sglang 0.5.23) | kind | our hook | why | what breaks if SGLang changes it |",
            "|---|---|---|---|---|"]
    for h in HOOKS:
        target = h.target.replace("sglang.srt.", "")
        rows.append(f"| `{target}` | {h.kind} | `{h.hook.replace('sglang_mux.', '')}` | {h.why} | {h.breaks} |")
    return "\n".join(rows)

"""PD hooks, installed by the plugin in every SGLang process (each a named patch of SGLang behaviour, listed in the
table of ``sglang_hooks.py``: groups ``pd-bootstrap``, ``pd-cpu``, ``pd-heavy-scores``).

* ``reject_malformed_bootstrap``  AROUND ``http_server.serve_generate_request``: on a prefill or decode
  server, a ``/generate`` whose bootstrap fields are malformed (or missing) is answered HTTP 400 naming the
  field (``disagg/bootstrap.py``), before SGLang hands it to the transfer engine. Aggregated servers: no-op.
* the CPU-only Mooncake patch of ``platform/cpu_pd.py`` (PD prefill schedulers, no GPU).
* the transfer of heavy-hitter scores in SGLang's PD metadata buffers (``disagg/heavy_scores.py``: four
  patches, no-ops in a process without a mux attention backend).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing

from sglang_mux.disagg.bootstrap import validate_bootstrap_fields
from sglang_mux.platform import has_cuda_gpu
from sglang_mux.sglang_hooks import SGLangHook, hooks_in, register_hooks

logger = logging.getLogger(__name__)

_installed = False


def _pd_mode() -> str:
    """'prefill', 'decode' or 'null' for the server this HTTP process serves."""
    try:
        from sglang.srt.entrypoints import http_server

        tm = http_server.get_global_state().tokenizer_manager
        return str(getattr(tm.server_args, "disaggregation_mode", "null") or "null")
    except Exception:
        return "null"


async def reject_malformed_bootstrap(original, obj, request, *args, **kwargs):
    mode = _pd_mode()
    if mode in ("prefill", "decode"):
        from fastapi.responses import ORJSONResponse

        from sglang_mux.serving.validation import RequestValidationError

        fields = {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
        try:
            validate_bootstrap_fields(fields, required=True)
        except RequestValidationError as e:
            logger.info("rejected /generate on a PD %s server: %s", mode, e)
            return ORJSONResponse(status_code=e.status_code, content=e.to_error_body())
    return await original(obj, request, *args, **kwargs)


def install_pd_hooks() -> list[SGLangHook]:
    """Register the PD hooks (idempotent); returns those registered. The HTTP hook only in the launcher process,
    where the server runs; the CPU-only Mooncake patch only without a CUDA GPU. ``plugin.register`` (or
    ``load_plugins``) applies them."""
    global _installed
    if _installed:
        return []
    records = []
    if not has_cuda_gpu():
        records += hooks_in("pd-cpu")
    records += hooks_in("pd-heavy-scores")
    if multiprocessing.parent_process() is None:
        records += hooks_in("pd-bootstrap")
    _installed = True
    return register_hooks(records)

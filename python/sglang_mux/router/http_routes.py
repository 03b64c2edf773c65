"""``GET /mux/stats``: the mux section of every scheduler's internal state (see router/hooks.py).

Added to SGLang's FastAPI app (``sglang_hooks.py``, group ``stats-route``) in the launcher's main process, where the
HTTP server runs.
"""

from __future__ import annotations

from sglang_mux.sglang_hooks import SGLangHook, hooks_in

STATS_PATH = "/mux/stats"


async def mux_stats():
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints import http_server

    states = await http_server._global_state.tokenizer_manager.get_internal_state()
    per_rank = [s.get("mux") for s in states if isinstance(s, dict)]
    if not any(per_rank):
        return JSONResponse({"error": "mux is not enabled on this server"}, status_code=404)
    return JSONResponse({"mux": per_rank[0], "per_rank": per_rank})


def install_stats_route() -> list[SGLangHook]:
    """Add ``GET /mux/stats`` to SGLang's app (once); returns the table's record of it."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if not any(getattr(r, "path", None) == STATS_PATH for r in app.router.routes):
        app.add_api_route(STATS_PATH, mux_stats, methods=["GET"])
    return list(hooks_in("stats-route"))

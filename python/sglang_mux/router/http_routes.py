"""``GET /mux/stats``: the mux section of every scheduler's internal state (see router/hooks.py)."""

from __future__ import annotations


def install_stats_route() -> None:
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if any(getattr(r, "path", None) == "/mux/stats" for r in app.router.routes):
        return

    async def mux_stats():
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        per_rank = [s.get("mux") for s in states if isinstance(s, dict)]
        if not any(per_rank):
            return JSONResponse({"error": "mux is not enabled on this server"}, status_code=404)
        return JSONResponse({"mux": per_rank[0], "per_rank": per_rank})

    app.add_api_route("/mux/stats", mux_stats, methods=["GET"])

"""Live placement at the cluster entry: each /generate goes to the PD cluster or to the aggregated server(s), as
:class:`~sglang_mux.router.placement.PlacementPolicy` decides from the prompt length, the live loads and the SLOs.

    python -m sglang_mux.disagg.placement_front --port 30000 \\
        --aggregated http://127.0.0.1:31000 --pd http://127.0.0.1:30500 \\
        --prefill http://127.0.0.1:31001 --decode http://127.0.0.1:31003 \\
        [--costs benchmark/results/pd_costs.json] [--mux-slo-ttft 2000 --mux-slo-tpot 200]

sglang-router 0.3.2 routes inside one kind of deployment (regular workers, or prefill/decode pairs) and has no
seam to choose between the two per request, so the choice is made one step in front of it; everything after the
choice is sglang-router's and SGLang's (``--pd`` is the router of the PD cluster, ``--aggregated`` a mux server or a
router in front of several). The body is forwarded unchanged (per-request mux fields included: put them in
``custom_labels`` for the PD path, docs/pd.md).

* **Loads**: SGLang's ``/v1/loads`` of the aggregated, prefill and decode servers, polled every ``--poll-s``
  (running requests, waiting uncached prompt tokens), plus what this front sent and has not seen start yet.
* **Costs, recalibrated online**: every streamed request's TTFT and TPOT, measured here, refit the cost model
  (:class:`OnlineCosts`: ridge regression toward the prior, with forgetting): the aggregated TTFT gives the prefill
  cost per token, every TPOT the decode step per request, the PD TTFT the transfer cost. ``--costs`` (the JSON of
  ``benchmark/goodput_pd.py --costs-only``) is only the prior, worth ``--prior-requests`` observations; without it
  the prior is :data:`DEFAULT_PRIOR`.
* ``GET /placement/stats``: decisions per path, requests measured, the costs in use, the last loads; ``GET /metrics``:
  the decisions and measurements as Prometheus counters (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
from fastapi import FastAPI, Request  # module level: the handlers' annotations are resolved here

from sglang_mux.router.placement import PATHS, SLO, Load, PlacementError, PlacementPolicy, RecordedCosts

logger = logging.getLogger(__name__)

FORGET = 0.98  # per observation: the fits weigh about the last 50 requests
DEFAULT_PRIOR = RecordedCosts(prefill_fixed_ms=10.0, prefill_per_token_ms=0.1, decode_step_fixed_ms=10.0,
                              decode_step_per_request_ms=1.0, transfer_fixed_ms=20.0, transfer_per_token_ms=0.01,
                              source="placement_front default prior")


class Ridge:
    """``y = x . theta``, ridge regression toward ``prior`` with weight ``weight`` (observations), forgetting."""

    def __init__(self, prior: Sequence[float], weight: float, scale: Sequence[float]):
        self.scale = np.asarray(scale, dtype=np.float64)  # features are divided by it (comparable magnitudes)
        self.theta0 = np.asarray(prior, dtype=np.float64) * self.scale
        self.lam = float(weight)
        k = len(prior)
        self.xtx, self.xty, self.n = np.zeros((k, k)), np.zeros(k), 0

    def observe(self, x: Sequence[float], y: float) -> None:
        v = np.asarray(x, dtype=np.float64) / self.scale
        self.xtx = FORGET * self.xtx + np.outer(v, v)
        self.xty = FORGET * self.xty + v * y
        self.n += 1

    def theta(self) -> np.ndarray:
        k = len(self.theta0)
        a = self.xtx + self.lam * np.eye(k)
        t = np.linalg.lstsq(a, self.xty + self.lam * self.theta0, rcond=None)[0]
        return np.maximum(t, 0.0) / self.scale


class OnlineCosts:
    """The placement cost model, refit from measured requests (module docstring)."""

    def __init__(self, prior: RecordedCosts, prior_requests: float = 8.0):
        p = prior
        self.prior = prior
        # natural units (ms, ms per token): with requests of one length, a change is put on the per-token term
        self.prefill = Ridge((p.prefill_fixed_ms, p.prefill_per_token_ms), prior_requests, (1.0, 1.0))
        self.step = Ridge((p.decode_step_fixed_ms, p.decode_step_per_request_ms), prior_requests, (1.0, 1.0))
        self.transfer = Ridge((p.transfer_fixed_ms, p.transfer_per_token_ms), prior_requests, (1.0, 1.0))
        self.measured = 0
        self.lock = threading.Lock()

    def costs(self) -> RecordedCosts:
        with self.lock:
            (pf, pt), (sf, sr), (tf, tt) = self.prefill.theta(), self.step.theta(), self.transfer.theta()
        return replace(self.prior, prefill_fixed_ms=float(pf), prefill_per_token_ms=float(pt),
                       decode_step_fixed_ms=max(float(sf), 1e-3), decode_step_per_request_ms=float(sr),
                       transfer_fixed_ms=float(tf), transfer_per_token_ms=float(tt),
                       decode_step_per_context_token_ms=self.prior.decode_step_per_context_token_ms,
                       source="online fit (prior: " + (self.prior.source or "recorded costs") + ")")

    def observe(self, path: str, prompt_tokens: int, load: Load, ttft_ms: Optional[float],
                tpot_ms: Optional[float]) -> None:
        """One measured request: ``load`` is what was queued / running on its path when it was sent."""
        c = self.costs()
        with self.lock:
            batch = (load.aggregated_running if path == "aggregated" else load.decode_running) + 1
            if tpot_ms is not None and tpot_ms > 0:
                self.step.observe((1.0, batch - 1), tpot_ms)
            step = c.step(batch)
            if ttft_ms is not None and ttft_ms > 0:
                if path == "aggregated":
                    tokens = load.aggregated_queued_tokens + prompt_tokens
                    self.prefill.observe((1.0, tokens), max(ttft_ms - step, 0.0))
                else:
                    prefill = c.prefill(load.prefill_queued_tokens + prompt_tokens)
                    self.transfer.observe((1.0, prompt_tokens), max(ttft_ms - prefill - step, 0.0))
            self.measured += 1

    def as_dict(self) -> dict:
        d = asdict(self.costs())
        d["measured_requests"] = self.measured
        return d


# ------------------------------------------------------------------ loads
def parse_loads(body) -> tuple[int, int]:
    """(running requests, waiting uncached prompt tokens) summed over a ``/v1/loads`` answer's DP ranks."""
    items = body.get("loads", body) if isinstance(body, dict) else body
    if isinstance(items, dict):
        items = [items]
    running = waiting = 0
    for it in items or ():
        if isinstance(it, dict):
            running += int(it.get("num_running_reqs", 0) or 0)
            waiting += int(it.get("num_waiting_uncached_tokens", 0) or 0)
    return running, waiting


@dataclass
class Upstreams:
    aggregated: str                      # where aggregated requests go (a server or a router)
    pd: str                              # the PD cluster's router
    loads: dict = field(default_factory=dict)  # role ("aggregated", "prefill", "decode") -> [server urls]


class LoadPoller:
    def __init__(self, upstreams: Upstreams, interval_s: float = 0.5):
        self.upstreams, self.interval_s = upstreams, interval_s
        self.seen: dict[str, tuple[int, int]] = {}  # role -> (running, waiting tokens)
        self.errors = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll_once(self) -> None:
        import httpx

        for role, urls in self.upstreams.loads.items():
            running = waiting = 0
            for url in urls:
                try:
                    r = httpx.get(url.rstrip("/") + "/v1/loads", timeout=5.0)
                    r.raise_for_status()
                    a, b = parse_loads(r.json())
                    running, waiting = running + a, waiting + b
                except Exception:  # noqa: BLE001 - a load we cannot read counts as unknown (0), not fatal
                    self.errors += 1
            self.seen[role] = (running, waiting)

    def start(self) -> "LoadPoller":
        def loop():
            while not self._stop.is_set():
                self.poll_once()
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True, name="mux-loads")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


class PlacementFront:
    """The decision, the forwarding and the measurements; :meth:`app` is the FastAPI app."""

    def __init__(self, upstreams: Upstreams, slo: SLO, prior: RecordedCosts = DEFAULT_PRIOR, *,
                 prior_requests: float = 8.0, poll_s: float = 0.5, tokenizer=None):
        self.upstreams, self.slo, self.tokenizer = upstreams, slo, tokenizer
        self.costs = OnlineCosts(prior, prior_requests)
        self.poller = LoadPoller(upstreams, poll_s)
        self.decisions = {p: 0 for p in PATHS}
        self.inflight_tokens = {p: 0 for p in PATHS}  # sent, first token not seen yet
        self.errors = 0
        self.lock = threading.Lock()
        self.registry, self.metrics = self._prometheus()

    @staticmethod
    def _prometheus():
        """The front's own Prometheus metrics (GET /metrics; docs/metrics.md), on a private registry."""
        from prometheus_client import CollectorRegistry, Counter

        reg = CollectorRegistry()
        return reg, {
            "decisions": Counter("sglang_mux_placement_decisions_total",
                                 "Requests the placement front sent to each path.", ["path"], registry=reg),
            "measured": Counter("sglang_mux_placement_measured_requests_total",
                                "Streamed requests whose TTFT/TPOT refit the placement costs.", registry=reg),
            "errors": Counter("sglang_mux_placement_upstream_errors_total",
                              "Streamed requests an upstream answered with a status other than 200.", registry=reg),
        }

    # -------------------------------------------------------------- decision
    def prompt_tokens(self, body: dict) -> int:
        ids = body.get("input_ids")
        if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
            return len(ids)
        text = body.get("text")
        if isinstance(text, str):
            if self.tokenizer is not None:
                return max(1, len(self.tokenizer(text)["input_ids"]))
            return max(1, len(text) // 4)  # without a tokenizer: about 4 characters per token
        raise PlacementError("text: one prompt (a string, or input_ids as a list of token ids) per request here")

    def load(self) -> Load:
        seen = self.poller.seen
        agg_run, agg_wait = seen.get("aggregated", (0, 0))
        _, pre_wait = seen.get("prefill", (0, 0))
        dec_run, _ = seen.get("decode", (0, 0))
        with self.lock:
            return Load(aggregated_queued_tokens=max(agg_wait, self.inflight_tokens["aggregated"]),
                        aggregated_running=agg_run, prefill_queued_tokens=max(pre_wait, self.inflight_tokens["pd"]),
                        decode_running=dec_run)

    def decide(self, body: dict):
        sp = body.get("sampling_params") or {}
        out = sp.get("max_new_tokens", 128) if isinstance(sp, dict) else 128
        if isinstance(out, bool) or not isinstance(out, int) or out < 1:
            raise PlacementError(f"sampling_params.max_new_tokens: expected an integer >= 1, got {out!r}")
        n = self.prompt_tokens(body)
        load = self.load()
        decision = PlacementPolicy(self.costs.costs(), self.slo).decide(n, out, load)
        with self.lock:
            self.decisions[decision.path] += 1
        self.metrics["decisions"].labels(path=decision.path).inc()
        return decision, n, load

    def stats(self) -> dict:
        return {"decisions": dict(self.decisions), "errors": self.errors, "costs": self.costs.as_dict(),
                "slo": asdict(self.slo), "loads": {k: {"running": v[0], "waiting_tokens": v[1]}
                                                   for k, v in self.poller.seen.items()},
                "load_poll_errors": self.poller.errors}

    # -------------------------------------------------------------- the HTTP side
    def app(self):
        import httpx
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.poller.start()
            try:
                yield
            finally:
                self.poller.stop()
                await client.aclose()

        app = FastAPI(lifespan=lifespan)

        def error(status: int, message: str, param: str = "") -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                           "code": status}}, status_code=status)

        @app.get("/health")
        async def health():
            return {"ok": True}

        @app.get("/placement/stats")
        async def placement_stats():
            return self.stats()

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/generate")
        async def generate(request: Request):
            try:
                body = await request.json()
            except json.JSONDecodeError as e:
                return error(400, f"body: not valid JSON ({e})")
            if not isinstance(body, dict):
                return error(400, "body: expected a JSON object")
            try:
                decision, n, load = self.decide(body)
            except PlacementError as e:
                return error(400, str(e), str(e).split(":", 1)[0])
            path = decision.path
            url = (self.upstreams.pd if path == "pd" else self.upstreams.aggregated).rstrip("/") + "/generate"
            with self.lock:
                self.inflight_tokens[path] += n
            sent = time.perf_counter()
            started = [False]

            def first_token():
                if not started[0]:
                    started[0] = True
                    with self.lock:
                        self.inflight_tokens[path] -= n

            def finish(ttft, tpot):
                first_token()
                if ttft is not None:
                    self.costs.observe(path, n, load, ttft, tpot)
                    self.metrics["measured"].inc()

            headers = {"content-type": "application/json", "x-mux-placement": path}
            if not body.get("stream"):
                try:
                    r = await client.post(url, json=body)
                finally:
                    first_token()
                return Response(r.content, status_code=r.status_code, media_type="application/json",
                                headers={"x-mux-placement": path})

            req = client.build_request("POST", url, json=body)
            upstream = await client.send(req, stream=True)

            async def relay():
                times, counts, buf = [], [], b""
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                        buf += chunk
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                                try:
                                    k = int(json.loads(line[5:]).get("meta_info", {}).get("completion_tokens", 0))
                                except (ValueError, AttributeError):
                                    continue
                                if k and (not counts or k > counts[-1]):
                                    if not times:
                                        first_token()
                                    times.append(time.perf_counter())
                                    counts.append(k)
                finally:
                    await upstream.aclose()
                    ttft = (times[0] - sent) * 1000.0 if times else None
                    tpot = ((times[-1] - times[0]) * 1000.0 / (counts[-1] - counts[0])
                            if len(times) > 1 and counts[-1] > counts[0] else None)
                    if upstream.status_code != 200:
                        self.errors += 1
                        self.metrics["errors"].inc()
                    finish(ttft, tpot)

            return StreamingResponse(relay(), status_code=upstream.status_code,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"),
                                     headers={"x-mux-placement": path})

        return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--aggregated", required=True, help="URL aggregated requests go to (a mux server or a router)")
    p.add_argument("--pd", required=True, help="URL of the PD cluster's sglang-router")
    p.add_argument("--aggregated-loads", nargs="*", default=None,
                   help="servers whose /v1/loads make the aggregated load (default: --aggregated)")
    p.add_argument("--prefill", nargs="*", default=[], help="prefill servers (their /v1/loads)")
    p.add_argument("--decode", nargs="*", default=[], help="decode servers (their /v1/loads)")
    p.add_argument("--costs", default="", help="recorded costs JSON: the prior of the online fit")
    p.add_argument("--prior-requests", type=float, default=8.0, help="weight of the prior, in measured requests")
    p.add_argument("--poll-s", type=float, default=0.5, help="seconds between /v1/loads polls")
    p.add_argument("--tokenizer", default="", help="tokenizer for text prompts (default: about 4 characters a token)")
    p.add_argument("--mux-slo-ttft", type=float, default=2000.0)
    p.add_argument("--mux-slo-tpot", type=float, default=200.0)
    args = p.parse_args(argv)
    try:
        slo = SLO(args.mux_slo_ttft, args.mux_slo_tpot)
        prior = RecordedCosts.load(args.costs) if args.costs else DEFAULT_PRIOR
        if not args.prior_requests >= 0:
            raise PlacementError(f"--prior-requests: must be >= 0, got {args.prior_requests}")
        if not args.poll_s > 0:
            raise PlacementError(f"--poll-s: must be > 0, got {args.poll_s}")
    except PlacementError as e:
        print(f"sglang-mux: error: {e}", file=sys.stderr)
        return 2
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loads = {"aggregated": args.aggregated_loads if args.aggregated_loads is not None else [args.aggregated],
             "prefill": args.prefill, "decode": args.decode}
    front = PlacementFront(Upstreams(args.aggregated, args.pd, {k: v for k, v in loads.items() if v}), slo, prior,
                           prior_requests=args.prior_requests, poll_s=args.poll_s, tokenizer=tok)
    import uvicorn

    uvicorn.run(front.app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

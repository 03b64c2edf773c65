"""Profile mux's decode step with py-spy: where the time of a batch of long-context requests goes.

    .venv/bin/python benchmark/profile_decode.py --context 8K --batch 8 --out benchmark/out/profile_decode

Starts a mux server with decode_latency.py's flags, prefills one ``--context``-token prefix, starts ``--batch``
requests of that prefix plus 32 own tokens, waits until SGLang logs a decode batch of all of them, then records
the scheduler process with py-spy (raw stack counts) for ``--seconds``. Prints the functions with the largest
share of busy samples (self and inclusive; "busy" = stacks inside a forward pass) and writes the raw profile
and a JSON summary under --out.

``--backend-only`` needs no server, model or py-spy: it drives the mux attention backend alone on synthetic KV
with the real model's attention shapes (``--layers``, ``--q-heads``, ``--kv-heads``, ``--head-dim``; SmolLM2-135M's by
default), one plan step plus every layer's ``forward_decode`` per decode step, and prints the time per step
against stock's decode attention (torch_native: one SDPA per request over its whole context) and the top
cProfile frames of the mux step:

    .venv/bin/python benchmark/profile_decode.py --backend-only --context 1K --batch 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PY_SPY = Path(sys.executable).with_name("py-spy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=C.positive_ints, default=[8192], help="context tokens per request")
    p.add_argument("--batch", type=C.positive_int, default=8)
    p.add_argument("--seconds", type=C.positive_int, default=15, help="py-spy recording time")
    p.add_argument("--output-tokens", type=C.positive_int, default=600, help="long enough to outlast the recording")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmark/out/profile_decode"))
    g = p.add_argument_group("--backend-only (no server)")
    g.add_argument("--backend-only", action="store_true", help="profile the attention backend alone (see above)")
    g.add_argument("--steps", type=C.positive_int, default=8, help="decode steps timed per system")
    g.add_argument("--layers", type=C.positive_int, default=30)
    g.add_argument("--q-heads", type=C.positive_int, default=9)
    g.add_argument("--kv-heads", type=C.positive_int, default=3)
    g.add_argument("--head-dim", type=C.positive_int, default=64)
    C.add_server_args(p, default_mode="keep")
    a = p.parse_args(argv)
    a.context = a.context[0]
    if a.context <= 32:
        p.error(f"--context: must be > 32 tokens, got {a.context}")
    if a.backend_only:
        if a.q_heads % a.kv_heads:
            p.error(f"--q-heads: must be a multiple of --kv-heads, got {a.q_heads} and {a.kv_heads}")
        return a
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        p.error("py-spy is not installed in this environment (pip install py-spy)")
    return a


def summarize(raw: Path, top: int = 15) -> dict:
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if not any("forward" in f or "run_batch" in f for f in frames):
            continue
        busy += int(n)
        self_c[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    share = lambda c: [{"frame": f, "share": n / busy} for f, n in c.most_common(top)] if busy else []  # noqa: E731
    mux_incl = collections.Counter({f: n for f, n in incl.items() if "sglang_mux" in f})
    return {"busy_samples": busy, "self": share(self_c), "inclusive_mux": share(mux_incl)}


def synthetic_backend(a: argparse.Namespace, cfg=None, delimiter_every: int = 10):
    """The mux attention backend alone on synthetic KV with the model shapes of ``a``: ``--batch`` requests of
    ``--context`` tokens, heavy scores and page summaries as a prefill leaves them, and chunk delimiters about every
    ``delimiter_every`` tokens (short sentences). Returns a namespace: ``be``, ``layers``, ``q``, ``k``, ``v``,
    ``batch(step)`` (a decode ForwardBatch stand-in), ``kv``, ``r2t`` and ``mux(fb)`` (one decode step: plan +
    every layer's ``forward_decode``)."""
    from types import SimpleNamespace

    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_mux.attention.backend import MuxAttentionBackend
    from sglang_mux.config import MuxConfig
    from sglang_mux.memory.requests import RequestRegistry

    torch.set_num_threads(1)
    dt = getattr(torch, {"half": "float16", "float": "float32"}.get(a.dtype, a.dtype))
    ctx, B, P, hq, hkv, d = a.context, a.batch, a.mux_page_size, a.q_heads, a.kv_heads, a.head_dim
    width = ctx + 2 * a.steps + P + 1
    kv = MHATokenToKVPool(size=B * width + P, page_size=P, dtype=dt, head_num=hkv, head_dim=d, layer_num=a.layers,
                          device="cpu", enable_memory_saver=False)
    r2t = ReqToTokenPool(size=B + 1, max_context_len=width, device="cpu", enable_memory_saver=False)
    gen = torch.Generator().manual_seed(a.seed)
    for i in range(a.layers):
        for buf in (kv.get_key_buffer(i), kv.get_value_buffer(i)):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dt))
    if cfg is None:
        cfg = MuxConfig(budget=a.mux_budget, page_size=P, drop_cold=a.mux_mode == "drop")
    be = MuxAttentionBackend(SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv), inner=None, mux_config=cfg)
    be.registry = RequestRegistry()
    for b in range(B):
        r2t.req_to_token[b + 1, :width] = torch.arange(P + b * width, P + (b + 1) * width, dtype=torch.int32)
        st = be.registry.get(f"r{b}")
        st.summarized, st.protected_len = True, ctx
        st.scores(a.layers, -(-ctx // P), "cpu").uniform_(generator=gen)  # heavy scores, as a prefill leaves them
        st.token_delims = torch.rand(ctx, generator=gen) < 1.0 / delimiter_every
        for i in range(a.layers):
            be.summaries.rebuild_from_keys(i, r2t.req_to_token[b + 1], 0, ctx)
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                              scaling=d**-0.5, is_cross_attention=False) for i in range(a.layers)]
    q, k, v = (torch.randn(B, h * d, generator=gen).to(dt) for h in (hq, hkv, hkv))
    mode = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: True)

    def batch(step):
        L = torch.full((B,), ctx + 1 + step)
        rows = torch.arange(1, B + 1)
        return SimpleNamespace(rids=[f"r{b}" for b in range(B)], forward_mode=mode, seq_lens_cpu=L, seq_lens=L,
                               req_pool_indices=rows, out_cache_loc=r2t.req_to_token[rows, ctx + step].long())

    def mux(fb):
        be._plan_step(fb)
        for layer in layers:
            be.forward_decode(q, k.view(B, hkv, d), v.view(B, hkv, d), layer, fb)

    return SimpleNamespace(be=be, layers=layers, q=q, k=k, v=v, batch=batch, kv=kv, r2t=r2t, mux=mux)


def backend_only(a: argparse.Namespace) -> int:
    """Time the decode attention of one step (plan + every layer) for stock's SDPA loop and mux, then profile mux."""
    import cProfile
    import io
    import pstats

    from torch.nn.functional import scaled_dot_product_attention

    syn = synthetic_backend(a)
    kv, r2t, layers, q, mux, batch = syn.kv, syn.r2t, syn.layers, syn.q, syn.mux, syn.batch
    ctx, B, hq, d = a.context, a.batch, a.q_heads, a.head_dim

    def stock(fb):  # torch_native's decode: one SDPA per request over its whole context
        for layer in layers:
            kb, vb = kv.get_key_buffer(layer.layer_id), kv.get_value_buffer(layer.layer_id)
            for b in range(B):
                s = r2t.req_to_token[b + 1, : int(fb.seq_lens[b])]
                scaled_dot_product_attention(q[b].view(1, hq, 1, d), kb[s].movedim(0, 1).unsqueeze(0),
                                             vb[s].movedim(0, 1).unsqueeze(0), scale=layer.scaling, enable_gqa=True)

    ms = {}
    for name, fn in (("stock", stock), ("mux", mux)):
        fn(batch(0))
        t0 = time.perf_counter()
        for step in range(1, a.steps + 1):
            fn(batch(step))
        ms[name] = (time.perf_counter() - t0) / a.steps * 1e3
    prof = cProfile.Profile()
    prof.enable()
    for step in range(a.steps + 1, 2 * a.steps + 1):
        mux(batch(step))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())
    print(f"SUMMARY profile_decode --backend-only | context {ctx} batch {B}: decode attention per step "
          f"stock {ms['stock']:.1f} ms, mux {ms['mux']:.1f} ms ({ms['mux'] / ms['stock']:.2f}x)")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.backend_only:
        return backend_only(a)
    C.stop_cleanly_on_sigterm()
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / "py-spy.txt"
    flags = C.server_flags(a, context_length=a.context + a.output_tokens + 64, max_running=a.batch,
                           chunked_prefill=a.context + 256)
    with C.start_server("mux", flags, a) as srv:
        prefix = C.prompt_ids(a.context - 32, C.stable_seed(a.seed, "profile"))
        C.stream_generate(srv.url, prefix, 1)
        prompts = [prefix + C.prompt_ids(32, C.stable_seed(a.seed, "profile", i)) for i in range(a.batch)]
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(r=C.concurrent_streams(srv.url, prompts, a.output_tokens)),
                              daemon=True)
        th.start()
        marker = f"Decode batch, #running-req: {a.batch}"
        while marker not in Path(srv.log_path).read_text(errors="replace"):
            if not th.is_alive():
                raise SystemExit("error: the batch finished before all requests decoded together; raise --output-tokens")
            time.sleep(1)
        pids = subprocess.run(["pgrep", "-g", str(srv.proc.pid), "-f", "sglang::scheduler"], capture_output=True,
                              text=True).stdout.split()
        if not pids:
            raise SystemExit("error: no scheduler process found under the server")
        C.progress(f"recording scheduler {pids[0]} for {a.seconds}s")
        spy = str(PY_SPY) if PY_SPY.exists() else "py-spy"
        subprocess.run([spy, "record", "--pid", pids[0], "--duration", str(a.seconds), "--rate", "100",
                        "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
        th.join()
    res = box.get("r") or []
    summary = {"benchmark": "profile_decode", "machine": C.machine_info(), "context": a.context, "batch": a.batch,
               **summarize(raw)}
    if res and not any(r.error for r in res):
        summary["tpot_s"] = C.decode_time_per_token(res)[0]
    C.write_result(a.out, "profile_decode", summary)
    for kind in ("self", "inclusive_mux"):
        print(f"-- {kind} (share of {summary['busy_samples']} busy samples)")
        for row in summary[kind]:
            print(f"{row['share']:6.1%}  {row['frame']}")
    print(f"SUMMARY profile_decode | context {a.context} batch {a.batch}: {summary['busy_samples']} busy samples; "
          f"top mux frame: {summary['inclusive_mux'][0]['frame'] if summary['inclusive_mux'] else 'n/a'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

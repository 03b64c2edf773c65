"""KV transfer per request, stock PD vs mux PD, and the cost of the decode side's page-summary metadata.

    .venv/bin/python benchmark/pd_transfer.py                       # bundled model, contexts 256,1K,4K
    .venv/bin/python benchmark/pd_transfer.py --lengths 1K,8K --out benchmark/results

For each system (stock SGLang PD, mux PD: prefill + decode + sglang-router, KV over mooncake_tcp on CPU) and each
context length, one request goes through the router; the bytes and time of its KV transfer are SGLang's own
counters on the prefill server (``--enable-metrics``: ``sglang:kv_transfer_total_mb`` and
``sglang:kv_transfer_latency_ms``, read from ``/metrics`` before and after).

Metadata (docs/pd.md): the decode side either receives the page summaries (min and max key per page, every layer:
``2/P`` of the K bytes, i.e. ``1/P`` of the KV bytes, more on the wire) or rebuilds them from the received keys.
The script measures the rebuild (``PageSummaryStore.rebuild_from_keys`` on the model's KV shapes, one thread)
and prices shipping at the transfer bandwidth it just measured.

Heavy-hitter scores: mux ships them in one more PD metadata slot per request (``disagg/heavy_scores.py``, a fixed
``num_layers x 2 x 256`` floats); rebuilding them on the decode side would need the observation window's queries,
i.e. a forward pass of the window's tokens over the whole prompt there. The script measures that forward pass
(HF transformers, the bundled model, one thread) against the slot's bytes. ``--systems none`` runs only the
metadata part (no servers). Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import signal
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT / "python"))

import requests  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import machine_info, positive_ints, progress, prompt_ids, write_result  # noqa: E402

COMMON = ["--dtype", "float32", "--max-running-requests", "8", "--max-total-tokens", "65536", "--log-level", "warning"]


def prom_value(text: str, name: str) -> float:
    """Sum of every sample of metric ``name`` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and re.match(re.escape(name) + r"(\{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def transfer_counters(prefill_url: str) -> dict:
    text = requests.get(prefill_url + "/metrics", timeout=30).text
    return {
        "mb": prom_value(text, "sglang:kv_transfer_total_mb_sum"),
        "count": prom_value(text, "sglang:kv_transfer_total_mb_count"),
        "latency_ms": prom_value(text, "sglang:kv_transfer_latency_ms_sum"),
    }


def measure_system(stock: bool, lengths: list[int], kv_bytes_per_token: int) -> list[dict]:
    from sglang_mux.disagg.cluster import PDCluster

    rows = []
    prefill_extra = ["--enable-metrics"]
    with PDCluster(COMMON, stock=stock, prefill_args=prefill_extra) as pd:
        for n in lengths:
            ids = prompt_ids(n, seed=1000 + n)
            before = transfer_counters(pd.prefill.url)
            t0 = time.perf_counter()
            r = pd.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0.0,
                                                                   "ignore_eos": True}}, timeout=600)
            r.raise_for_status()
            wall = time.perf_counter() - t0
            after = None
            for _ in range(20):  # the prefill side records the metric when it sees the transfer complete
                after = transfer_counters(pd.prefill.url)
                if after["count"] > before["count"]:
                    break
                time.sleep(0.5)
            d = {k: after[k] - before[k] for k in after}
            got = int(round(d["mb"] * 1024 * 1024)) if d["count"] else None
            rows.append({
                "system": "stock_pd" if stock else "mux_pd",
                "context_tokens": n,
                "transfers": d["count"],
                "transfer_bytes": got,
                "kv_bytes_of_context": n * kv_bytes_per_token,
                "transfer_ms": d["latency_ms"] if d["count"] else None,
                "request_s": wall,
            })
            progress(f"{rows[-1]['system']} {n} tokens: {got} bytes, {rows[-1]['transfer_ms']} ms")
    return rows


def model_kv_shape(model_dir: Path) -> tuple[int, int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    return cfg["num_hidden_layers"], kv, cfg.get("head_dim") or cfg["hidden_size"] // heads


def rebuild_ms(layers: int, kv_heads: int, head_dim: int, tokens: int, page: int, dtype, repeats: int = 5) -> float:
    """Median time to rebuild one request's summaries (every layer) from its keys, in ms, one thread."""
    import torch

    from sglang_mux.memory.page_summaries import PageSummaryStore

    torch.set_num_threads(1)
    pool = tokens + page
    k = torch.randn(pool, kv_heads, head_dim).to(dtype)
    store = PageSummaryStore([k], page)  # one layer: every layer costs the same
    row = torch.randperm(pool // page)[: -(-tokens // page)].repeat_interleave(page) * page
    row = (row + torch.arange(page).repeat(row.numel() // page))[:tokens].to(torch.int32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.rebuild_from_keys(0, row, 0, tokens)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2] * layers


def window_forward_ms(model, tokens: int, window: int, repeats: int = 3) -> float:
    """Median time of the forward pass of a prompt's last ``window`` tokens over the cached rest, in ms, one
    thread: what the decode side would spend to get the observation window's queries back."""
    import torch

    torch.set_num_threads(1)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            cache = model(ids[:, : tokens - window], use_cache=True).past_key_values
            t0 = time.perf_counter()
            model(ids[:, tokens - window :], past_key_values=cache, use_cache=True)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=positive_ints, default=[256, 1024, 4096], help="context lengths (e.g. 256,1K,4K)")
    p.add_argument("--page-size", type=int, default=16, help="mux page size (as --mux-page-size)")
    p.add_argument("--systems", default="stock,mux", help="comma list of stock,mux; none: only the metadata costs")
    p.add_argument("--window", type=int, default=32, help="observation window in tokens (as --mux-observation-window)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results", help="directory of the JSON result")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip() and s.strip() != "none"]
    bad = [s for s in systems if s not in ("stock", "mux")]
    if bad:
        p.error(f"--systems: allowed: stock, mux; got {bad}")

    import torch

    from sglang_mux.disagg.cluster import mooncake_unavailable_reason
    from sglang_mux.models import default_model_path

    why = mooncake_unavailable_reason() if systems else None
    if why:
        print(f"pd_transfer: cannot run: {why}", file=sys.stderr)
        return 2
    layers, kv_heads, head_dim = model_kv_shape(Path(default_model_path()))
    kv_per_token = 2 * layers * kv_heads * head_dim * 4  # float32 serving
    rows = []
    for s in systems:
        rows += measure_system(s == "stock", args.lengths, kv_per_token)

    P = args.page_size
    meta = []
    speeds = [r["transfer_bytes"] / r["transfer_ms"] for r in rows if r["transfer_bytes"] and r["transfer_ms"]]
    bytes_per_ms = sorted(speeds)[len(speeds) // 2] if speeds else None
    shapes = {"bundled": (layers, kv_heads, head_dim, torch.float32), "llama8b_like": (32, 8, 128, torch.bfloat16)}
    for shape_name, (L, H, D, dt) in shapes.items():
        elt = torch.tensor([], dtype=dt).element_size()
        for n in args.lengths:
            ship = 2 * (-(-n // P)) * L * H * D * elt  # kmin + kmax per page, every layer
            meta.append({
                "shape": shape_name, "context_tokens": n,
                "rebuild_ms": rebuild_ms(L, H, D, n, P, dt),
                "ship_extra_bytes": ship,
                "ship_extra_fraction_of_kv": ship / (2 * n * L * H * D * elt),
                "ship_extra_ms_at_measured_bandwidth": ship / bytes_per_ms if bytes_per_ms else None,
            })

    from sglang_mux.disagg.heavy_scores import SHIPPED_PAGES

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    slot = layers * 2 * SHIPPED_PAGES * 4
    heavy = []
    for n in tqdm(args.lengths, desc="heavy-score rebuild (window forward)"):
        heavy.append({
            "shape": "bundled", "context_tokens": n, "window": args.window,
            "rebuild_ms": window_forward_ms(model, n, args.window),
            "ship_bytes": slot, "ship_fraction_of_kv": slot / (n * kv_per_token),
            "ship_ms_at_measured_bandwidth": slot / bytes_per_ms if bytes_per_ms else None,
        })

    print(f"\nKV transfer per request (prefill -> decode over {'mooncake_tcp'}, SGLang's counters)")
    print(f"{'system':10s} {'context':>8s} {'bytes':>12s} {'KV bytes of context':>20s} {'ms':>8s}")
    for r in rows:
        ms = f"{r['transfer_ms']:.1f}" if r["transfer_ms"] is not None else "-"
        print(f"{r['system']:10s} {r['context_tokens']:8d} {str(r['transfer_bytes']):>12s} {r['kv_bytes_of_context']:20d} {ms:>8s}")
    print(f"\nPage-summary metadata on the decode side (page size {P}): rebuild vs ship")
    print(f"{'shape':13s} {'context':>8s} {'rebuild ms':>11s} {'ship +bytes':>12s} {'ship +ms':>9s}")
    for m in meta:
        sm = f"{m['ship_extra_ms_at_measured_bandwidth']:.2f}" if m["ship_extra_ms_at_measured_bandwidth"] else "-"
        print(f"{m['shape']:13s} {m['context_tokens']:8d} {m['rebuild_ms']:11.3f} {m['ship_extra_bytes']:12d} {sm:>9s}")
    print(f"\nHeavy-hitter scores on the decode side (bundled model, window {args.window}): rebuild vs ship")
    print(f"{'context':>8s} {'rebuild ms':>11s} {'ship bytes':>11s} {'of the KV':>10s} {'ship ms':>8s}")
    for h in heavy:
        sm = f"{h['ship_ms_at_measured_bandwidth']:.3f}" if h["ship_ms_at_measured_bandwidth"] else "-"
        print(f"{h['context_tokens']:8d} {h['rebuild_ms']:11.2f} {h['ship_bytes']:11d} {h['ship_fraction_of_kv']:10.5f} {sm:>8s}")
    write_result(args.out, "pd_transfer" if systems else "pd_metadata", {
        "machine": machine_info(), "page_size": P, "transfer": rows, "metadata": meta, "heavy_scores": heavy,
        "measured_transfer_bytes_per_ms": bytes_per_ms,
    })
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    raise SystemExit(main())

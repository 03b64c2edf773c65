"""Non-weight device memory per request vs context length, by tier: stock SGLang against mux, one run.

    .venv/bin/python benchmark/memory_scaling.py --out benchmark/out/memory_scaling
    .venv/bin/python benchmark/memory_scaling.py --contexts 1K,4K --output-tokens 32

For each system (started here, one at a time, same SGLang flags) and each context length: the radix cache is
flushed, one request of that many prompt tokens streams ``--output-tokens`` tokens, and while it runs the script
polls the allocator's own accounting through SGLang's ``/v1/loads``: ``num_used_tokens`` = pool capacity -
(free + evictable cached tokens), i.e. the KV slots held by running requests (not RSS). Two values per request:

* ``decode``: median of the samples taken while the request is decoding (its steady state);
* ``peak``:   the largest sample, prefill included.

Bytes = tokens x KV bytes per token (K and V of every layer, from the model config and --dtype). Mux adds its page
summaries (``/mux/stats`` ``summary_bytes``, a pool-wide store of 1/page_size of the KV's size) pro rata to the
slots the request holds, as device overhead. Lower tiers: with ``--mux-mode tier`` (host-DRAM tier) the host and
disk bytes are the growth of ``/mux/stats`` ``tiers.<name>.kv_bytes`` since the request started (median while
decoding); stock and the other modes have no lower tier (0).

Mux runs in drop mode by default (``--mux-drop-cold``): in keep mode all exact KV stays in the device pool and
memory does not shrink; in tier mode the cold pages move to host memory instead of being freed. Prints bytes per request and growth vs the first context, then one summary line.
Writes memory_scaling.json and memory_scaling.png under --out.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=C.positive_ints, default=C.positive_ints("1K,2K,4K,7K"),
                   help="prompt lengths in tokens, comma-separated, K suffix allowed (default 1K,2K,4K,7K: the default model's context is 8K; 16K-32K need --model-path tiny)")
    p.add_argument("--output-tokens", type=C.positive_int, default=128, help="tokens generated per request")
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between allocator samples")
    p.add_argument("--ratio-base", type=C.positive_int, default=4096,
                   help="context the growth target is measured against (default 4K; must be one of --contexts)")
    C.add_run_args(p, "memory_scaling", default_mode="drop")
    a = p.parse_args(argv)
    if not 0 < a.poll_interval <= 5:
        p.error(f"--poll-interval: must be in (0, 5] seconds, got {a.poll_interval}")
    a.contexts = sorted(set(a.contexts))
    if a.ratio_base not in a.contexts:
        a.ratio_base = a.contexts[0]
    return a


def measure_request(srv, ctx: int, a: argparse.Namespace, mux: bool) -> dict:
    """Run one request and sample the allocator while it runs."""
    C.flush_cache(srv.url)
    idle = C.used_tokens(srv.url)
    prompt = C.prompt_ids(ctx, seed=C.stable_seed(a.seed, "memory", ctx))
    box: dict = {}
    samples: list[tuple[float, int, int | None, dict]] = []  # (time, used tokens, mux held tokens, tier bytes)
    tiers0 = _tier_bytes(srv.url) if mux else {}
    t = threading.Thread(target=lambda: box.update(res=C.stream_generate(srv.url, prompt, a.output_tokens)),
                         daemon=True)
    t0 = time.perf_counter()
    t.start()
    while t.is_alive():
        used = C.used_tokens(srv.url) - idle
        held, tiers = None, {}
        if mux:
            stats = C.get_json(srv.url, "/mux/stats")["mux"]
            held = sum(stats["device_kv_tokens_held"].values()) if stats["device_kv_tokens_held"] else None
            tiers = {n: b - tiers0.get(n, 0) for n, b in _tier_bytes(srv.url, stats).items()}
        samples.append((time.perf_counter(), used, held, tiers))
        time.sleep(a.poll_interval)
    t.join()
    res = box["res"]
    if res.error:
        raise RuntimeError(f"ctx={ctx}: {res.error}")
    decoding = [s for s in samples if res.times[0] <= s[0] <= res.end]
    if not decoding:
        raise RuntimeError(f"ctx={ctx}: no allocator sample while decoding; use more --output-tokens")
    out = {
        "context": ctx, "idle_used_tokens": idle, "samples": len(samples), "decode_samples": len(decoding),
        "decode_used_tokens": int(C.median([s[1] for s in decoding])),
        "peak_used_tokens": max(s[1] for s in samples),
        "seconds": time.perf_counter() - t0,
    }
    helds = [s[2] for s in decoding if s[2] is not None]
    if mux:
        out["mux_held_tokens"] = int(C.median(helds)) if helds else None
        names = sorted({n for s in decoding for n in s[3]})
        out["lower_tier_bytes"] = {n: int(C.median([s[3].get(n, 0) for s in decoding])) for n in names}
    return out


def _tier_bytes(url: str, stats: dict | None = None) -> dict:
    """KV bytes each lower tier (host, disk, ...) holds now, from ``/mux/stats``."""
    stats = stats or C.get_json(url, "/mux/stats")["mux"]
    return {n: int(t.get("kv_bytes", 0)) for n, t in stats.get("tiers", {}).items() if n != "device"}


def run_system(system: str, a: argparse.Namespace) -> dict:
    # One prefill chunk per prompt: torch_native's extend attends from every position of the sequence (not just the
    # new tokens), so a second chunk costs a whole second prefill on CPU.
    flags = C.server_flags(a, context_length=max(a.contexts) + a.output_tokens + 64, max_running=4,
                           chunked_prefill=max(a.contexts) + 256)
    kv_bpt = C.kv_bytes_per_token(a)
    points = {}
    with C.start_server(system, flags, a) as srv:
        info = C.get_json(srv.url, "/get_server_info")
        capacity = int(info.get("max_total_num_tokens") or 0)
        summary_bpt = 0.0
        mux_kv_bpt = None
        if system == "mux":
            stats = C.get_json(srv.url, "/mux/stats")["mux"]
            mux_kv_bpt = stats["kv_bytes_per_token"]
            summary_bpt = stats["summary_bytes"] / capacity if capacity else 0.0
        for ctx in a.contexts:
            pt = measure_request(srv, ctx, a, system == "mux")
            per_tok = kv_bpt + summary_bpt
            lower = pt.get("lower_tier_bytes", {})
            pt["decode_bytes"] = {"device": pt["decode_used_tokens"] * per_tok, "host": lower.get("host", 0),
                                  "disk": lower.get("disk", 0)}
            pt["peak_bytes"] = {"device": pt["peak_used_tokens"] * per_tok}
            points[ctx] = pt
            C.progress(f"{system} ctx={ctx}: decode {pt['decode_used_tokens']} tokens "
                       f"({pt['decode_bytes']['device'] / 2**20:.2f} MiB device, "
                       f"{pt['decode_bytes']['host'] / 2**20:.2f} MiB host), peak {pt['peak_used_tokens']} tokens")
        if system == "mux":
            final = C.get_json(srv.url, "/mux/stats")["mux"]
        else:
            final = None
    return {"points": points, "kv_bytes_per_token": kv_bpt, "mux_reported_kv_bytes_per_token": mux_kv_bpt,
            "summary_bytes_per_token": summary_bpt, "pool_capacity_tokens": capacity, "mux_stats": final,
            "flags": flags + (C.mux_flags(a) if system == "mux" else [])}


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when nothing was measured for ``den`` (reported as n/a, never a crash)."""
    return num / den if den else None


def _x(v: float | None, fmt: str) -> str:
    return "n/a".rjust(len(format(1.0, fmt)) + 1) if v is None else format(v, fmt) + "x"


def analyse(a, systems: dict) -> list[dict]:
    rows = []
    for ctx in a.contexts:
        row = {"context": ctx}
        for name, res in systems.items():
            pt, base = res["points"][ctx], res["points"][a.ratio_base]
            row[f"{name}_decode_mib"] = pt["decode_bytes"]["device"] / 2**20
            row[f"{name}_peak_mib"] = pt["peak_bytes"]["device"] / 2**20
            row[f"{name}_host_mib"] = pt["decode_bytes"]["host"] / 2**20
            row[f"{name}_disk_mib"] = pt["decode_bytes"]["disk"] / 2**20
            row[f"{name}_growth"] = _ratio(pt["decode_bytes"]["device"], base["decode_bytes"]["device"])
        if len(systems) == 2:
            row["mux_over_stock"] = _ratio(row["mux_decode_mib"], row["stock_decode_mib"])
        rows.append(row)
    return rows


def print_table(rows: list[dict], systems: dict, base: int) -> None:
    names = list(systems)
    print(f"{'ctx':>7} " + " ".join(f"{n + ' MiB/req':>14} {n + ' peak':>11} {n + ' vs ' + C.k_label(base):>13}" for n in names)
          + (f" {'mux/stock':>10}" if len(names) == 2 else ""))
    tiered = [n for n in names if any(r[n + "_host_mib"] or r[n + "_disk_mib"] for r in rows)]
    for r in rows:
        for n in tiered:
            print(f"{'':>7} {n} lower tiers at {C.k_label(r['context'])}: host {r[n + '_host_mib']:.3f} MiB, "
                  f"disk {r[n + '_disk_mib']:.3f} MiB")
        print(f"{r['context']:>7} " + " ".join(
            f"{r[n + '_decode_mib']:>14.3f} {r[n + '_peak_mib']:>11.3f} {_x(r[n + '_growth'], '>12.2f')}" for n in names)
              + (f" {_x(r['mux_over_stock'], '>9.3f')}" if "mux_over_stock" in r else ""))


def summary_line(a, rows: list[dict], systems: dict) -> str:
    top = rows[-1]
    parts = [f"{n} {top[n + '_decode_mib']:.2f} MiB/req at {C.k_label(top['context'])} "
             f"({_x(top[n + '_growth'], '.2f')} its {C.k_label(a.ratio_base)} value)" for n in systems]
    tail = f", mux/stock {_x(top['mux_over_stock'], '.3f')}" if "mux_over_stock" in top else ""
    return "SUMMARY memory_scaling | device bytes per request while decoding: " + "; ".join(parts) + tail


def plot(a, systems: dict, path: Path) -> None:
    fig, ax = C.figure(figsize=(6, 4))
    for name, res in systems.items():
        label = "stock SGLang" if name == "stock" else f"mux (budget {a.mux_budget}, {a.mux_mode})"
        ys = [res["points"][c]["decode_bytes"]["device"] / 2**20 for c in a.contexts]
        ax.plot(a.contexts, ys, marker="o", label=label + ", decoding")
        ys = [res["points"][c]["peak_bytes"]["device"] / 2**20 for c in a.contexts]
        ax.plot(a.contexts, ys, marker="x", linestyle="--", alpha=0.6, label=label + ", peak (prefill)")
        host = [res["points"][c]["decode_bytes"]["host"] / 2**20 for c in a.contexts]
        if any(host):
            ax.plot(a.contexts, [max(h, 1e-3) for h in host], marker="s", linestyle=":", label=label + ", host tier")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(a.contexts, [C.k_label(c) for c in a.contexts])
    C.finish_axes(ax, "context length (tokens)", "device KV bytes per request (MiB)", y_from_zero=False,
                  title="Non-weight device memory per request (allocator accounting)", legend_size=8)
    C.save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    C.stop_cleanly_on_sigterm()
    systems = {s: run_system(s, a) for s in a.systems}
    rows = analyse(a, systems)
    payload = {"benchmark": "memory_scaling", "machine": C.machine_info(), "config": {
        "contexts": a.contexts, "output_tokens": a.output_tokens, "mux_budget": a.mux_budget,
        "mux_page_size": a.mux_page_size, "mux_mode": a.mux_mode, "dtype": a.dtype, "ratio_base": a.ratio_base},
        "systems": {n: {**r, "points": {str(k): v for k, v in r["points"].items()}} for n, r in systems.items()},
        "table": rows}
    payload["summary"] = summary_line(a, rows, systems)
    C.write_result(a.out, "memory_scaling", payload)
    if not a.no_plot:
        plot(a, systems, a.out / "memory_scaling.png")
    print_table(rows, systems, a.ratio_base)
    print(payload["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Routed vs dense decode attention: one layer, Llama-3.1-8B head shapes, contexts 4K-128K.

    python benchmark/kernels/routed_decode.py --out benchmark/out/routed_decode

On a GPU (defaults: 32 q heads, 8 kv heads, head dim 128, bf16, page size 16, contexts 4K..128K, batch 1 and
32, budgets 2K and 4K tokens) it times, per (batch, context, budget):
  dense_triton / routed_triton      our Triton kernel over every page / over the routed page list
  dense_flashinfer / routed_flashinfer  FlashInfer paged decode over the full / reduced page table (if installed)
  route_triton                      the per-layer page choice (page-summary scores + top-k + table fill)
and reports achieved bandwidth (K/V bytes read / time) next to the device's measured copy bandwidth.
Without a GPU it runs the torch path only, at tiny shapes, and says so: those numbers describe this CPU, not
the product. Prints one summary line; writes results.json and routed_decode.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mux_kernels import reference as ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmark/out/routed_decode", help="folder for results.json and the PNG")
    p.add_argument("--contexts", type=_ints, default=None, help="context lengths (tokens), comma-separated")
    p.add_argument("--batches", type=_ints, default=None, help="batch sizes, comma-separated")
    p.add_argument("--budgets", type=_ints, default=None, help="routed budgets in tokens, comma-separated")
    p.add_argument("--q-heads", type=int, default=32 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--iters", type=int, default=50 if gpu else 5)
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--recent-pages", type=int, default=4)
    args = p.parse_args(argv)
    args.gpu = gpu
    if args.contexts is None:
        args.contexts = [4096, 8192, 16384, 32768, 65536, 131072] if gpu else [512, 1024, 2048, 4096]
    if args.batches is None:
        args.batches = [1, 32] if gpu else [1, 4]
    if args.budgets is None:
        args.budgets = [2048, 4096] if gpu else [128, 256]
    for name in ("q_heads", "kv_heads", "head_dim", "page_size", "iters"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.q_heads % args.kv_heads:
        p.error(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.page_size & (args.page_size - 1):
        p.error(f"--page-size must be a power of two; got {args.page_size}")
    for b in args.budgets:
        if b % args.page_size or b // args.page_size < args.sink_pages + args.recent_pages:
            p.error(f"--budgets: {b} must be a multiple of --page-size and cover sink+recent pages")
    if not gpu and args.dtype == "bf16":
        p.error("--dtype bf16 is not measured on CPU; allowed there: fp16, fp32")
    return args


# ---- a page-aligned pool: request b has pages at random physical pages ----


def make_batch(batch, context, args, device):
    p = args.page_size
    pages = context // p + (1 if context % p else 0)
    num_phys = batch * pages + 1
    g = torch.Generator(device="cpu").manual_seed(context + batch)
    phys = (torch.randperm(num_phys - 1, generator=g) + 1).reshape(batch, pages)
    slots = (phys[:, :, None] * p + torch.arange(p)).reshape(batch, pages * p)[:, :context]
    r2t = torch.zeros(batch, pages * p, dtype=torch.int32)
    r2t[:, :context] = slots.to(torch.int32)
    dtype = DTYPES[args.dtype]
    k = torch.randn(num_phys * p, args.kv_heads, args.head_dim, dtype=dtype, device=device)
    v = torch.randn(num_phys * p, args.kv_heads, args.head_dim, dtype=dtype, device=device)
    q = torch.randn(batch, args.q_heads, args.head_dim, dtype=dtype, device=device)
    return {
        "q": q, "k": k, "v": v, "r2t": r2t.to(device),
        "rpi": torch.arange(batch, device=device), "seq_lens": torch.full((batch,), context, dtype=torch.int32,
                                                                              device=device),
        "num_pages": torch.full((batch,), pages, dtype=torch.int32, device=device), "pages": pages,
        "phys": phys.to(device),
    }


def routed_list(data, budget_pages, args):
    scores = torch.rand(data["q"].shape[0], data["pages"], generator=torch.Generator().manual_seed(1))
    pl, counts = ref.select_pages(scores, data["num_pages"].cpu(), budget_pages, args.sink_pages, args.recent_pages)
    return pl.to(torch.int32).to(data["q"].device), counts.to(torch.int32).to(data["q"].device)


def full_list(data):
    b, n = data["q"].shape[0], data["pages"]
    dev = data["q"].device
    return (torch.arange(n, dtype=torch.int32, device=dev).expand(b, n).contiguous(),
            torch.full((b,), n, dtype=torch.int32, device=dev))


# ---- the torch path (what the CPU serves today): gather the listed positions, masked softmax ----


def torch_paged_decode(q, k, v, r2t, rpi, seq_lens, page_list, counts, page_size, scale):
    b, hq, d = q.shape
    hkv = k.shape[1]
    lanes = torch.arange(page_list.shape[1] * page_size, device=q.device)
    entry, within = lanes // page_size, lanes % page_size
    pos = page_list.long()[:, entry] * page_size + within
    valid = (entry[None] < counts[:, None]) & (pos < seq_lens[:, None]) & (pos >= 0)
    slots = r2t[rpi.long()[:, None], pos.clamp(0, r2t.shape[1] - 1)].long()
    keys = k[slots].float()  # [B, T, Hkv, D]
    vals = v[slots].float()
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    logits = torch.einsum("bhgd,bthd->bhgt", qg, keys) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bthd->bhgd", torch.softmax(logits, dim=-1), vals)
    return out.reshape(b, hq, d).to(q.dtype)


# ---- timing ----


def time_call(fn, iters, gpu):
    """Median seconds per call."""
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=max(20, iters), return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(gpu, device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), 20, gpu)
    return 2 * n / t


def kv_bytes(tokens_per_req, batch, args):
    elt = torch.finfo(DTYPES[args.dtype]).bits // 8
    return 2 * batch * tokens_per_req * args.kv_heads * args.head_dim * elt


def methods_for(args):
    if not args.gpu:
        return ["dense_torch", "routed_torch"]
    names = ["dense_triton", "routed_triton", "route_triton"]
    try:
        import flashinfer  # noqa: F401

        names += ["dense_flashinfer", "routed_flashinfer"]
    except Exception:  # noqa: BLE001
        pass
    return names


def check_against_reference(args, device) -> float:
    """Max |routed output - float64 reference| on a small case, for the path this run times."""
    small = make_batch(2, 8 * args.page_size + 3, args, device)
    pl, counts = routed_list(small, args.sink_pages + args.recent_pages + 1, args)
    scale = 1.0 / math.sqrt(args.head_dim)
    common = (small["q"], small["k"], small["v"], small["r2t"], small["rpi"], small["seq_lens"])
    if args.gpu:
        import mux_kernels

        got = mux_kernels.routed_paged_decode(*common, pl, counts, args.page_size, scale)
    else:
        got = torch_paged_decode(*common, pl, counts, args.page_size, scale)
    want = ref.routed_decode(*common, pl, counts, args.page_size, scale)
    return float((got.double() - want).abs().max())


def run_case(data, budget_pages, args, methods, with_dense: bool):
    """Time every method for one (batch, context, budget); dense methods only when `with_dense`."""
    scale = 1.0 / math.sqrt(args.head_dim)
    p = args.page_size
    batch = data["q"].shape[0]
    context = int(data["seq_lens"][0])
    rl, rc = routed_list(data, budget_pages, args)
    fl, fc = full_list(data)
    routed_tokens = min(context, int(rc[0]) * p)
    rows = []

    def row(name, seconds, tokens):
        if name.startswith("dense") and not with_dense:
            return
        nbytes = kv_bytes(tokens, batch, args) if tokens else 0
        rows.append({"method": name, "batch": batch, "context": context, "budget_tokens": budget_pages * p,
                     "time_us": seconds * 1e6, "kv_bytes": nbytes, "gbps": nbytes / seconds / 1e9 if tokens else None})

    common = (data["q"], data["k"], data["v"], data["r2t"], data["rpi"], data["seq_lens"])
    if "dense_torch" in methods:
        if with_dense:
            row("dense_torch", time_call(lambda: torch_paged_decode(*common, fl, fc, p, scale), args.iters, False),
                context)
        row("routed_torch", time_call(lambda: torch_paged_decode(*common, rl, rc, p, scale), args.iters, False),
            routed_tokens)
        return rows, None
    import mux_kernels

    if with_dense:
        row("dense_triton", time_call(lambda: mux_kernels.routed_paged_decode(*common, fl, fc, p, scale),
                                      args.iters, True), context)
    row("routed_triton", time_call(lambda: mux_kernels.routed_paged_decode(*common, rl, rc, p, scale), args.iters,
                                   True), routed_tokens)
    # the per-layer page choice: summaries for every page, scores, top-k (stable sort), on the device
    kmin = data["k"].view(-1, p, args.kv_heads, args.head_dim).amin(dim=1)
    kmax = data["k"].view(-1, p, args.kv_heads, args.head_dim).amax(dim=1)
    row("route_triton", time_call(lambda: mux_kernels.select_pages_on_device(
        data["q"], kmin, kmax, data["phys"].to(torch.int32), data["num_pages"], budget_pages, args.sink_pages,
        args.recent_pages), args.iters, True), 0)
    check = None
    if "routed_flashinfer" in methods:
        from sglang_mux.attention.flashinfer_path import FlashInferRoutedDecode
        from sglang_mux.attention.flashinfer_tables import plan_routed_counts

        lens = [context] * batch
        cases = [("routed_flashinfer", budget_pages, rl)]
        if with_dense:
            cases.insert(0, ("dense_flashinfer", data["pages"], fl))
        for name, budget, plist in cases:
            path = FlashInferRoutedDecode(max_batch=batch, budget_pages=budget, page_size=p,
                                          num_qo_heads=args.q_heads, num_kv_heads=args.kv_heads,
                                          head_dim=args.head_dim, kv_dtype=DTYPES[args.dtype],
                                          device=data["q"].device)
            path.plan_step(lens, plan_routed_counts(lens, p, budget), scale)
            out = path.run_layer(data["q"], data["k"], data["v"], page_list=plist, req_to_token=data["r2t"],
                                 req_pool_indices=data["rpi"])
            row(name, time_call(lambda: path.run_layer(data["q"], data["k"], data["v"]), args.iters, True),
                context if name.startswith("dense") else routed_tokens)
            if name == "routed_flashinfer":
                tri = mux_kernels.routed_paged_decode(*common, rl, rc, p, scale)
                check = float((out.float() - tri.float()).abs().max())
    return rows, check


def plot(rows, args, copy_bw, out_dir: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.batches), figsize=(6 * len(args.batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], args.batches):
        for method in sorted({r["method"] for r in rows}):
            for budget in args.budgets:
                pts = [r for r in rows if r["method"] == method and r["batch"] == batch
                       and (r["budget_tokens"] == budget)]
                if not pts:
                    continue
                label = method if method.startswith("dense") else f"{method} budget={budget}"
                ax.plot([r["context"] for r in pts], [r["time_us"] for r in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("time per layer (us)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(out_dir / "routed_decode.png", dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if not args.gpu:
        torch.set_num_threads(1)
    device = "cuda" if args.gpu else "cpu"
    device_name = torch.cuda.get_device_name() if args.gpu else f"CPU ({platform.processor() or platform.machine()})"
    mode = "GPU" if args.gpu else "CPU: torch path only, tiny shapes; not GPU numbers"
    methods = methods_for(args)
    copy_bw = copy_bandwidth(args.gpu, device)
    ref_diff = check_against_reference(args, device)
    rows, checks = [], []
    for batch in args.batches:
        for context in args.contexts:
            data = make_batch(batch, context, args, device)
            for i, budget in enumerate(args.budgets):
                case_rows, check = run_case(data, budget // args.page_size, args, methods, with_dense=i == 0)
                rows.extend(case_rows)
                if check is not None:
                    checks.append(check)
            del data
            if args.gpu:
                torch.cuda.empty_cache()
    for r in rows:
        r["frac_of_copy_bw"] = (r["gbps"] * 1e9 / copy_bw) if r["gbps"] else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "mode": mode, "device": device_name, "torch": torch.__version__, "python": sys.version.split()[0],
        "shapes": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "page_size": args.page_size, "dtype": args.dtype},
        "copy_bandwidth_gbps": copy_bw / 1e9, "methods": methods, "rows": rows,
        "max_abs_diff_routed_vs_float64_reference": ref_diff,
        "max_abs_diff_flashinfer_vs_triton_routed": max(checks) if checks else None,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, args, copy_bw, out_dir, f"{mode} - {device_name}")
    print(summary_line(rows, args, copy_bw, mode, device_name, out_dir) + f"; max |routed - ref| {ref_diff:.1e}")
    return 0


def summary_line(rows, args, copy_bw, mode, device_name, out_dir) -> str:
    ctx_lo, ctx_hi, batch, budget = min(args.contexts), max(args.contexts), max(args.batches), min(args.budgets)
    prefix = "torch" if not args.gpu else "triton"

    def t(method, ctx):
        for r in rows:
            if r["method"] == method and r["context"] == ctx and r["batch"] == batch and r["budget_tokens"] == budget:
                return r
        return None

    dense_hi, routed_lo, routed_hi = t(f"dense_{prefix}", ctx_hi), t(f"routed_{prefix}", ctx_lo), t(
        f"routed_{prefix}", ctx_hi)
    bw = routed_hi["frac_of_copy_bw"] or 0.0
    return (
        f"routed_decode [{mode}; {device_name}] batch={batch} budget={budget}: routed {prefix} "
        f"{routed_lo['time_us']:.0f}us@{ctx_lo} -> {routed_hi['time_us']:.0f}us@{ctx_hi} "
        f"(dense {dense_hi['time_us']:.0f}us@{ctx_hi}, {dense_hi['time_us'] / routed_hi['time_us']:.1f}x); "
        f"routed K/V read at {100 * bw:.0f}% of copy bandwidth {copy_bw / 1e9:.0f} GB/s; -> {out_dir}"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Record router traces from the real model: what each leaf would rank, and where attention really went.

    .venv/bin/python scripts/record_router_traces.py                       # defaults below, ~5 min on 2 CPU cores
    .venv/bin/python scripts/record_router_traces.py --tasks niah_single --lengths 1024 --samples 1 --steps 4

For every prompt of the needle tasks (``benchmark/quality/tasks.py``; plain completion prompts, no chat
template), HF transformers on CPU (float32) prefills the prompt, then decodes ``--steps`` greedy tokens with
FULL attention. An attention function registered with transformers (``AttentionInterface``) sees every
layer's post-RoPE queries and keys (what the KV pool holds): SDPA for the prefill, eager (explicit softmax) for
the decode steps. Recorded, per prompt (``<task>-<length>-s<seed>-i<index>.pt``, ``torch.save``):

    meta           task, length, seed, index, prompt tokens, layers, heads, page size, softmax scale, group pages
    delims         bool [prompt tokens]: chunk delimiters of the prompt (``memory/chunks.py``, as the server computes)
    snapkv         [layers, prompt pages]: the prompt's observation-window scores (last 32 prompt queries,
                   ``importance.snapkv_page_scores``): the heavy-hitter scores at the first decode step
    steps[t]       decode step t (its query at position prompt + t, ``seq_len`` = prompt + t + 1 keys):
      mass         float16 [layers, Hq, pages]: the true attention mass per 16-token page, per head (its mean
                   over heads is the page's mass; per head so the trainer can renormalize over selected pages
                   the way routed attention does)
      page_bounds  [layers, Hq, pages]: the Quest bound of q . k per page and head, from per-page key min/max
                   summaries (``routed_decode.quest_head_bounds``)
      group_bounds [layers, Hq, groups]: the same over the complete groups of ``--group-pages`` complete pages
                   (the server's two-level retrieval scoring, ``step_planner.page_scores``)

What the leaves rank is derived from these in ``scripts/train_router_gate.py``: sink and recent by position;
heavy = snapkv + the mass of the steps before (H2O-style, ``importance.accumulate_decode_mass``); retrieval =
``combine_head_bounds(bounds, "mass", scale / temperature)`` with the group stage for the query-aware pages of
the split under test; chunk = chunks (``memory/chunks.py``) ranked by their best heavy page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import torch  # noqa: E402

from sglang_mux.attention.importance import snapkv_page_scores  # noqa: E402
from sglang_mux.attention.routed_decode import quest_head_bounds  # noqa: E402

DEFAULT_OUT = os.path.join("benchmark", "results", "router_traces")
TRACE_VERSION = 1


class Recorder:
    """What the registered attention function saw in the last forward, per layer."""

    def __init__(self):
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.probs: dict[int, torch.Tensor] = {}
        self.window = 32
        self.scaling = None


REC = Recorder()


def mux_trace_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for the prefill, eager for decode steps; keeps the post-RoPE queries/keys (and decode probs)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    li = module.layer_idx
    REC.scaling = scaling
    REC.k[li] = key[0].detach()  # [Hkv, L, D]
    if query.shape[2] > 1:
        REC.q[li] = query[0, :, -REC.window :].detach()  # [Hq, W, D]
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    out, w = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    REC.q[li] = query[0, :, -1].detach()  # [Hq, D]
    REC.probs[li] = w[0, :, -1].detach().float()  # [Hq, L]
    return out, w


def page_summaries(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key min/max ``[Hkv, pages, D]`` of ``keys [Hkv, L, D]`` (the last page partial)."""
    h, L, d = keys.shape
    n = math.ceil(L / page_size)
    pad = n * page_size - L
    kf = keys.float()
    if pad:
        kmin = torch.cat([kf, kf[:, -1:].expand(h, pad, d)], dim=1)  # repeat the last key: min/max unchanged
    else:
        kmin = kf
    kp = kmin.view(h, n, page_size, d)
    return kp.amin(dim=2), kp.amax(dim=2)


def page_mass(probs: torch.Tensor, page_size: int) -> torch.Tensor:
    """``probs [Hq, L]`` summed per page -> ``[Hq, pages]``."""
    hq, L = probs.shape
    n = math.ceil(L / page_size)
    out = torch.zeros(hq, n * page_size)
    out[:, :L] = probs
    return out.view(hq, n, page_size).sum(dim=2)


def record_prompt(model, tokenizer, sample, steps: int, page_size: int, group_pages: int, window: int,
                  table) -> dict:
    from sglang_mux.memory.chunks import delimiter_mask

    ids = tokenizer.encode(sample.prompt)
    L0 = len(ids)
    REC.window = window
    nl = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        snap = []
        for li in range(nl):
            q_win = REC.q[li].transpose(0, 1)  # [W, Hq, D]
            w = q_win.shape[0]
            keys = REC.k[li].transpose(0, 1)  # [L, Hkv, D]
            snap.append(snapkv_page_scores(q_win, torch.arange(L0 - w, L0), keys, REC.scaling, page_size))
        snapkv = torch.stack(snap)
        tok = int(out.logits[0, -1].argmax())
        recs, generated = [], []
        for t in range(steps):
            generated.append(tok)
            seq_len = L0 + t + 1
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            n_full = (seq_len - 1) // page_size
            m = n_full // group_pages
            mass, pb, gb = [], [], []
            for li in range(nl):
                keys = REC.k[li]
                assert keys.shape[1] == seq_len, (keys.shape, seq_len)
                kmin, kmax = page_summaries(keys, page_size)
                q = REC.q[li]
                pb.append(quest_head_bounds(q, kmin, kmax))
                if m > 0:
                    h, _, d = kmin.shape
                    gmin = kmin[:, : m * group_pages].reshape(h, m, group_pages, d).amin(dim=2)
                    gmax = kmax[:, : m * group_pages].reshape(h, m, group_pages, d).amax(dim=2)
                    gb.append(quest_head_bounds(q, gmin, gmax))
                else:
                    gb.append(torch.zeros(q.shape[0], 0))
                mass.append(page_mass(REC.probs[li], page_size))
            recs.append({"seq_len": seq_len, "token": tok, "mass": torch.stack(mass).half(),
                         "page_bounds": torch.stack(pb), "group_bounds": torch.stack(gb)})
            tok = int(out.logits[0, -1].argmax())
    cfg = model.config
    meta = {"version": TRACE_VERSION, "task": sample.task, "length": sample.length, "seed": sample.seed,
            "index": sample.index, "prompt_tokens": L0, "layers": nl, "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "page_size": page_size,
            "scale": float(REC.scaling), "group_pages": group_pages, "observation_window": window,
            "answers": list(sample.answers), "output": tokenizer.decode(generated)}
    return {"meta": meta, "delims": delimiter_mask(ids, table), "snapkv": snapkv, "steps": recs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"folder for the traces (default {DEFAULT_OUT})")
    ap.add_argument("--model", default="smollm2", help="HF model folder or a short name (smollm2, tiny)")
    ap.add_argument("--tasks", default="needle", help="task list (benchmark/quality/tasks.py), default: needle")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--seeds", default="0,1,2", help="one sample per task, length and seed")
    ap.add_argument("--samples", type=int, default=1, help="samples per task, length and seed")
    ap.add_argument("--steps", type=int, default=8, help="greedy decode steps recorded per prompt")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--group-pages", type=int, default=8, help="--mux-retrieval-group-pages of the server")
    ap.add_argument("--observation-window", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from tqdm import tqdm
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from benchmark.quality.tasks import generate_tasks, parse_task_list
    from sglang_mux.memory.chunks import delimiter_table
    from sglang_mux.models import resolve_model_path

    torch.set_num_threads(args.threads)
    AttentionInterface.register("mux_trace", mux_trace_attention)
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="mux_trace").eval()
    table = delimiter_table(tok)
    os.makedirs(args.out, exist_ok=True)
    ignore = os.path.join(args.out, ".gitignore")
    if not os.path.exists(ignore):  # traces are data (tens of MB), not sources
        with open(ignore, "w") as f:
            f.write("*\n")
    tasks = parse_task_list(args.tasks)
    lengths = [int(x) for x in args.lengths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [(t, n, s) for t in tasks for n in lengths for s in seeds]
    t0 = time.time()
    written = []
    bar = tqdm(total=len(jobs) * args.samples, desc="traces", unit="prompt")
    for task, length, seed in jobs:
        for sample in generate_tasks(task, tok, length, args.samples, seed):
            bar.set_postfix_str(f"{task} {length} s{seed}")
            rec = record_prompt(model, tok, sample, args.steps, args.page_size, args.group_pages,
                                args.observation_window, table)
            name = f"{task}-{length}-s{seed}-i{sample.index}.pt"
            torch.save(rec, os.path.join(args.out, name))
            written.append({"file": name, "prompt_tokens": rec["meta"]["prompt_tokens"],
                            "output": rec["meta"]["output"], "answers": rec["meta"]["answers"]})
            bar.update(1)
    bar.close()
    # one manifest for the folder: runs that add seeds (or re-record some) merge into it, by file name
    mpath = os.path.join(args.out, "manifest.json")
    runs, traces = [], {}
    if os.path.exists(mpath):
        with open(mpath) as f:
            old = json.load(f)
        runs, traces = old.get("runs", []), {t["file"]: t for t in old.get("traces", [])}
    runs.append({"model": os.path.basename(os.path.normpath(path)), "tasks": tasks, "lengths": lengths,
                 "seeds": seeds, "samples": args.samples, "steps": args.steps, "page_size": args.page_size,
                 "group_pages": args.group_pages, "seconds": round(time.time() - t0, 1)})
    traces.update({t["file"]: t for t in written})
    with open(mpath, "w") as f:
        json.dump({"runs": runs, "traces": [traces[k] for k in sorted(traces)]}, f, indent=1)
    print(f"{len(written)} traces in {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

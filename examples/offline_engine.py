"""Offline use: sglang.Engine in-process with the mux memory (the plugin loads by itself).

    SGLANG_USE_CPU_ENGINE=1 .venv/bin/python examples/offline_engine.py [--json]

The Engine spawns its scheduler processes, so it must run under ``if __name__ == "__main__"``.
"""

import argparse
import json
import os

from sglang_mux.config import MuxConfig
from sglang_mux.models import default_model_path
from sglang_mux.platform import has_cuda_gpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true", help="print the outputs as one JSON line")
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args()

    import sglang as sgl

    cfg = MuxConfig(budget=args.budget)
    cfg.export()  # the scheduler processes read it from the environment
    cpu = {} if has_cuda_gpu() else {"device": "cpu", "mem_fraction_static": 0.05, "disable_cuda_graph": True}
    if not has_cuda_gpu():
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    engine = sgl.Engine(
        model_path=default_model_path(),
        radix_cache_backend="mux",
        attention_backend="mux",
        page_size=cfg.page_size,  # mux pages are KV-pool pages
        dtype="float32",
        log_level="warning",
        **cpu,
    )
    try:
        prompts = ["the blue river", "hello there, tell me a story about a green mountain"]
        outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        if args.json:
            print(json.dumps([{"prompt": p, "output_ids": o["output_ids"]} for p, o in zip(prompts, outs)]))
        else:
            for p, o in zip(prompts, outs):
                print(f"{p!r} -> {o['text']!r}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

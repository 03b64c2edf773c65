"""Write a local ShareGPT-style dataset for SGLang's benchmarks (no download).

    .venv/bin/python scripts/make_dataset.py --out /tmp/mux_sharegpt.json --num 32 --prompt-words 200 --output-words 32

Each record is ``{"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": ANSWER}]}``, the
format `python -m sglang.benchmark.offline_throughput --dataset-name sharegpt --dataset-path FILE` reads; the
answer's length sets the number of output tokens asked for. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_default_model import WORDS  # noqa: E402


def make_records(num: int, prompt_words: int, output_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = max(1, int(prompt_words * rng.uniform(0.8, 1.2)))
        prompt = " ".join(rng.choice(WORDS) for _ in range(n))
        answer = " ".join(rng.choice(WORDS) for _ in range(output_words))
        out.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--output-words", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name in ("num", "prompt_words", "output_words"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    a.out.write_text(json.dumps(make_records(a.num, a.prompt_words, a.output_words, a.seed)))
    print(f"wrote {a.num} records to {a.out}")


if __name__ == "__main__":
    main()

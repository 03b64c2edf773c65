"""Where a probe model's listed answers go wrong: teacher-forced accuracy per digit of each answer value, and
how often the needle head (last layer, head 0) looks hardest at the token it should copy.

    .venv/bin/python scripts/probe_answer_digits.py --model python/sglang_mux/models/default \
        --task niah_multivalue --length 2048 --samples 25

Each sample's prompt is followed by its reference completion (teacher forcing), so every value is read in
the context a perfect model would have written. Digit 0 of a value is where the head picks a needle (for
multi-value: the needle after the one just written), digits 1-5 continue copying from it. ``--json`` writes
the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark.quality.tasks import TASKS, make_sample  # noqa: E402

NEEDLE_HEAD = 0  # last layer; the head the training's pointer loss supervises


def digit_table(model, tokenizer, task: str, length: int, samples: int, seed: int, progress: bool = False) -> list[dict]:
    """Rows ``{digit, n, attention, prediction}``: for the k-th digit of every answer value, how often the needle
    head's strongest attention is on the source token and how often the model predicts the digit."""
    import torch
    from tqdm import tqdm

    import train_probe_model as T

    T.SEPARATOR_IDS.update(T.separator_token_ids(tokenizer))
    n, attended, predicted = {}, {}, {}
    for i in tqdm(range(samples), desc="answer digits", disable=not progress):
        s = make_sample(task, tokenizer, length, i, seed)
        row = T.sample_row(tokenizer, s)
        flat = row[0][0] + row[1][0]
        with torch.no_grad():
            out = model(torch.tensor([flat]), output_attentions=True)
        pred, attn = out.logits[0].argmax(-1), out.attentions[-1][0][NEEDLE_HEAD]
        k = 0
        for q, src in T.copy_pairs(row):
            k = 0 if tokenizer.convert_ids_to_tokens(flat[q]).lstrip("Ġ").isalpha() or flat[q] in T.SEPARATOR_IDS else k + 1
            n[k] = n.get(k, 0) + 1
            attended[k] = attended.get(k, 0) + int(int(attn[q].argmax()) == src)
            predicted[k] = predicted.get(k, 0) + int(int(pred[q]) == flat[q + 1])
    return [{"digit": k, "n": n[k], "attention": attended[k] / n[k], "prediction": predicted[k] / n[k]} for k in sorted(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "python/sglang_mux/models/default", help="a probe model folder (HF format)")
    ap.add_argument("--task", default="niah_multivalue", choices=[t for t in TASKS if t.startswith("niah_")])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--seed", type=int, default=12345, help="task seed (12345: the held-out evaluation samples)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        ap.error(f"--model: {args.model} has no config.json (expected a probe model folder)")
    if args.samples < 1 or args.length < 128:
        ap.error("--samples must be >= 1 and --length >= 128")

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    rows = digit_table(model, tokenizer, args.task, args.length, args.samples, args.seed, progress=True)
    print(f"{args.task} at {args.length} tokens, {args.samples} samples, teacher-forced:")
    print("| digit | n | needle head on the source | digit predicted |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['digit']} | {r['n']} | {r['attention']:.3f} | {r['prediction']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"task": args.task, "length": args.length, "samples": args.samples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

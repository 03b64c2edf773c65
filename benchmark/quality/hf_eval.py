"""Score the suite with HF transformers greedy decoding: no server, the oracle for served results.

    .venv/bin/python -m benchmark.quality.hf_eval --model smollm2 \
        --tasks niah_single,vt --lengths 1024,2048 --samples 50
"""

from __future__ import annotations

import argparse
import json
import time

from benchmark.quality.scoring import exact, mean, recall
from benchmark.quality.tasks import TaskSample, generate_tasks, parse_task_list


def greedy_outputs(model, tokenizer, samples: list[TaskSample], bar=None) -> list[str]:
    """Greedy completions (special tokens dropped), one sample at a time, stopping at EOS; ``bar`` (a tqdm) is
    advanced once per sample."""
    import torch

    outs = []
    device = next(model.parameters()).device
    for s in samples:
        ids = torch.tensor([tokenizer.encode(s.prompt)], device=device)
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=s.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        outs.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
        if bar is not None:
            bar.update(1)
    return outs


def evaluate(model, tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int = 0, show: int = 0,
             progress: bool = False) -> dict:
    """``{task: {length: {"recall": r, "exact": e, "n": n}}}`` for greedy outputs of ``model``; prints the first
    ``show`` outputs of each cell next to their answers; ``progress`` shows a bar over all samples."""
    from tqdm import tqdm

    table: dict = {}
    bar = tqdm(total=len(tasks) * len(lengths) * n, desc="hf_eval", unit="sample", disable=not progress)
    for task in tasks:
        for length in lengths:
            bar.set_postfix_str(f"{task} {length}")
            samples = generate_tasks(task, tokenizer, length, n, seed)
            outs = greedy_outputs(model, tokenizer, samples, bar)
            for i, (o, s) in enumerate(zip(outs[:show], samples)):
                print(f"{task} {length} #{i}: recall {recall(o, s.answers):.2f} answers {', '.join(s.answers)} | output {o.strip()!r}")
            table.setdefault(task, {})[str(length)] = {
                "recall": round(mean(recall(o, s.answers) for o, s in zip(outs, samples)), 4),
                "exact": round(mean(exact(o, s.answers) for o, s in zip(outs, samples)), 4),
                "n": n,
            }
    bar.close()
    return table


def markdown(table: dict, metric: str = "exact") -> str:
    """Rows: tasks; columns: lengths; cells: ``metric`` (``n`` samples each)."""
    lengths = sorted({int(n) for cells in table.values() for n in cells})
    lines = ["| task | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for task, cells in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{cells[str(n)][metric]:.2f}" if str(n) in cells else "-" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory, or a short name: smollm2, tiny")
    ap.add_argument("--tasks", default="niah_single,niah_multikey,vt")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the table as JSON here")
    ap.add_argument("--show", type=int, default=0, help="print the first N outputs of each cell next to their answers")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    from sglang_mux.models import resolve_model_path

    args.model = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    table = evaluate(model, tok, parse_task_list(args.tasks), lengths, args.samples, args.seed, args.show,
                     progress=True)
    print(json.dumps(table, indent=1))
    print("exact match:\n" + markdown(table, "exact") + "\nrecall:\n" + markdown(table, "recall"))
    print(f"{time.time() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()

"""Extend a trained probe's usable context with YaRN RoPE scaling, written into its config.json (no training).

The probe trains with plain RoPE on prompts of at most ``--original-length`` tokens. Past about 1.5x that its
retrieval collapses: the slow RoPE dimensions, which never finished a turn in training, reach angles it never saw,
and attention spreads over more tokens than it learned to pick from. YaRN interpolates those slow dimensions by
``--factor`` (the fast ones stay as trained) and sharpens attention by ``0.1 ln(factor) + 1`` on queries and keys,
so prompts up to ``factor x original-length`` tokens look like training. HF transformers and SGLang both read it
from ``config.json`` (``rope_parameters`` with ``rope_type: yarn``); the weights are not touched. The scaling holds
at every length, so it also shifts short prompts a little (docs/quality.md has both tables).

    .venv/bin/python scripts/extend_probe_context.py --model python/sglang_mux/models/default \\
        --factor 4 --original-length 3072

``scripts/train_probe_model.py --init-from`` trains on with plain RoPE again (it drops the scaling unless
``--keep-rope-scaling``), so run this after the last stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def yarn_parameters(rope_theta: float, factor: float, original_length: int) -> dict:
    """``rope_parameters`` for YaRN as HF transformers (and SGLang's llama) read them; the defaults of the
    remaining YaRN knobs (beta_fast 32, beta_slow 1, attention factor ``0.1 ln(factor) + 1``) are the same in both."""
    return {"rope_type": "yarn", "rope_theta": rope_theta, "factor": factor,
            "original_max_position_embeddings": original_length}


def extend(model_dir: Path, factor: float, original_length: int, command: str) -> dict:
    """Write YaRN into ``model_dir/config.json`` (replacing any earlier scaling) and record it in the model card.
    Returns the new ``rope_parameters``. Raises ``ValueError`` naming the bad field."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"--model: {model_dir} has no config.json (expected a probe saved by scripts/train_probe_model.py)")
    if not factor > 1:
        raise ValueError(f"--factor: must be > 1 (the context is extended to factor x --original-length), got {factor}")
    cfg = json.loads(cfg_path.read_text())
    max_positions = cfg.get("max_position_embeddings")
    if not 0 < original_length <= (max_positions or original_length):
        raise ValueError(f"--original-length: must be in 1..{max_positions} (max_position_embeddings), got {original_length}")
    old = cfg.get("rope_parameters") or {}
    theta = old.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_parameters"] = yarn_parameters(theta, factor, original_length)
    cfg.pop("rope_scaling", None)  # the pre-5.0 spelling of the same field; one source of truth
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card_path = model_dir / "mux_model_card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        trained = (card.get("context_extension") or {}).get("trained_rope", old)  # the RoPE training ran with
        card["context_extension"] = {
            "command": command, "rope_parameters": cfg["rope_parameters"], "trained_rope": trained,
            "note": "hf_greedy_accuracy above is the training script's evaluation, under trained_rope",
        }
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return cfg["rope_parameters"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="probe directory (config.json, weights, model card)")
    ap.add_argument("--factor", type=float, default=4.0, help="context multiple YaRN is set for (> 1)")
    ap.add_argument("--original-length", type=int, required=True, help="longest prompt the probe was trained on, in tokens")
    args = ap.parse_args(argv)
    command = ".venv/bin/python scripts/extend_probe_context.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        params = extend(args.model, args.factor, args.original_length, command)
    except ValueError as e:
        ap.error(str(e))
    print(f"{args.model / 'config.json'}: rope_parameters = {json.dumps(params)}")


if __name__ == "__main__":
    main()

"""The bundled default model: where it lives and how to find it.

The place is stable (`sglang_mux/models/default/`, HF format: config, safetensors, tokenizer); what sits
there is built by `scripts/build_default_model.py` and later trained by `scripts/train_probe_model.py`.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


def default_model_path() -> str:
    """Path of the bundled model; a clear error (with the command that builds it) if it is missing."""
    cfg = DEFAULT_MODEL_DIR / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing at {DEFAULT_MODEL_DIR}; "
            "build it with: .venv/bin/python scripts/build_default_model.py"
        )
    return str(DEFAULT_MODEL_DIR)

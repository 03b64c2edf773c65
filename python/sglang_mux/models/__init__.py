"""Models by short name: what ``--model-path smollm2`` or ``--model-path tiny`` means.

========== ===================================================================================================
``smollm2`` the served default: SmolLM2-135M-Instruct, installed by set-up into a cache folder
            (:mod:`sglang_mux.models.smollm2`); the model every quality and speed claim is measured on
``tiny``    a 3-layer model bundled in the package (``sglang_mux/models/tiny/``, a few MB), the fast fixture of
            the tests: same code paths, milliseconds per request
========== ===================================================================================================

Anything else given as a model path is a Hugging Face folder (or whatever SGLang accepts) and is passed on
as it is. ``$MUX_DEFAULT_MODEL`` (a short name or a path) changes what a launch without ``--model-path``
serves; the test suite sets it to ``tiny``.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny"
DEFAULT_MODEL = "smollm2"
SHORT_NAMES = ("smollm2", "tiny")


def tiny_model_path() -> str:
    """Path of the bundled tiny model; a clear error if the package was installed without it."""
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the bundled tiny model is missing at {TINY_MODEL_DIR}; reinstall sglang-mux")
    return str(TINY_MODEL_DIR)


def smollm2_path() -> str:
    """Path of the installed SmolLM2 folder; a one-line error with the install command if it is missing or damaged."""
    from sglang_mux.models import smollm2

    folder = smollm2.model_dir()
    why = smollm2.check(folder)
    if why is not None:
        raise FileNotFoundError(
            f"the default model SmolLM2-135M-Instruct is not installed ({why}); "
            "install it with: .venv/bin/python -m sglang_mux.models.smollm2 (make serve / make test do it)"
        )
    return str(folder)


def resolve_model_path(spec: str) -> str:
    """A short name (``smollm2``, ``tiny``) to its folder; any other string is returned unchanged."""
    if spec == "smollm2":
        return smollm2_path()
    if spec == "tiny":
        return tiny_model_path()
    return spec


def default_model_path() -> str:
    """The model a launch without ``--model-path`` serves: ``$MUX_DEFAULT_MODEL`` or ``smollm2``."""
    return resolve_model_path(os.environ.get("MUX_DEFAULT_MODEL") or DEFAULT_MODEL)

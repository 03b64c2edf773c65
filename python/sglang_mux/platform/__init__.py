"""Platform detection and the CPU compatibility layer (everything that exists only because there is no GPU)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess


@functools.lru_cache(maxsize=1)
def has_cuda_gpu() -> bool:
    """True when a CUDA GPU is usable. Never imports torch's CUDA runtime on CPU-only installs."""
    if os.environ.get("MUX_FORCE_CPU"):
        return False
    try:
        import torch

        if torch.version.cuda is None:
            return False
        return bool(torch.cuda.is_available())
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=10).returncode == 0
    except Exception:
        return False


def platform_attention_backend() -> str:
    """The backend the mux backend wraps: flashinfer on a GPU, torch_native on CPU."""
    return "flashinfer" if has_cuda_gpu() else "torch_native"

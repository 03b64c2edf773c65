"""When the Triton kernels can run, decided without importing Triton at package import time.

Two ways to run: compiled on a CUDA device (tensors on `cuda`), or Triton's CPU interpreter
(`TRITON_INTERPRET=1` set *before* the kernel modules are imported; tensors on `cpu`; fp32/fp16 only,
bf16 arithmetic is wrong there, so callers upcast). Anything else raises `TritonUnavailable` with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import torch


class TritonUnavailable(RuntimeError):
    """The Triton kernels cannot run for these tensors on this machine."""


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on by the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_runnable(*tensors: torch.Tensor) -> str:
    """Return "cuda" or "interpret" for the device of `tensors`, or raise `TritonUnavailable`."""
    if not triton_installed():
        raise TritonUnavailable("triton is not installed")
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise TritonUnavailable(f"tensors must share one device; got {sorted(devices)}")
    dev = devices.pop()
    if dev == "cuda":
        if interpreter_enabled():
            raise TritonUnavailable("TRITON_INTERPRET=1 is set: the interpreter needs cpu tensors, got cuda")
        return "cuda"
    if dev == "cpu":
        if not interpreter_enabled():
            raise TritonUnavailable(
                "cpu tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing mux_kernels kernels"
            )
        for t in tensors:
            if t.dtype == torch.bfloat16:
                raise TritonUnavailable("bf16 is wrong in Triton's interpreter: upcast to float32 on cpu")
        return "interpret"
    raise TritonUnavailable(f"device {dev!r} is not supported; allowed: cuda, cpu (with TRITON_INTERPRET=1)")

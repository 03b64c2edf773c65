"""When the Triton kernels can run, decided without importing Triton at package import time.

Two ways to run: compiled on a CUDA device (tensors on `cuda`), or Triton's CPU interpreter (tensors on `cpu`;
fp32/fp16 only, bf16 arithmetic is wrong there, so callers upcast). Triton fixes the mode of a kernel when
its module is imported (`TRITON_INTERPRET` at that moment, and the interpreter reads it again while it
runs: launches go through `launch_env`): `load_kernels(interpret=True)` imports the kernel
modules in interpreter mode without leaving the variable set for the rest of the process (child processes
such as servers must not inherit it). Anything that cannot run raises `TritonUnavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

import torch

KERNEL_MODULES = ("mux_kernels.page_score", "mux_kernels.routed_decode", "mux_kernels.page_copy")

_loaded_mode: dict[str, bool] = {}  # kernel module -> imported in interpreter mode


class TritonUnavailable(RuntimeError):
    """The Triton kernels cannot run for these tensors on this machine."""


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on by the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def note_loaded(module_name: str) -> None:
    """Called by each kernel module at import: remember the mode Triton gave its kernels."""
    _loaded_mode[module_name] = interpreter_enabled()


@contextlib.contextmanager
def _interpret_env(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def launch_env(mode: str):
    """Context for a kernel launch: Triton's interpreter also reads `TRITON_INTERPRET` while it runs."""
    return _interpret_env(True) if mode == "interpret" else contextlib.nullcontext()


def interpreter_loadable() -> bool:
    """True when this process can still run Triton's interpreter: `triton.language` is not imported yet, or
    was imported with the interpreter on (its own library functions are then interpreted too)."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True
    return type(getattr(lang.standard, "max", None)).__name__ == "InterpretedFunction"


def load_kernels(interpret: bool) -> None:
    """Import every kernel module in the given mode; RuntimeError if one is already loaded in the other.

    interpret=True needs `interpreter_loadable()`: Triton's interpreter only works when `triton.language` was
    first imported with it on; otherwise this raises `TritonUnavailable` (start the process with
    TRITON_INTERPRET=1 instead).
    """
    if not triton_installed():
        raise TritonUnavailable("triton is not installed")
    if interpret and not interpreter_loadable():
        raise TritonUnavailable(
            "triton was imported in compiled mode before load_kernels(interpret=True); start the process with "
            "TRITON_INTERPRET=1 set"
        )
    for name in KERNEL_MODULES:
        if name in sys.modules:
            if _loaded_mode.get(name) != interpret:
                raise RuntimeError(
                    f"{name} is already loaded with interpret={_loaded_mode.get(name)}; load_kernels must run first"
                )
            continue
        with _interpret_env(interpret):
            importlib.import_module("triton.language")
            importlib.import_module(name)


def kernels_interpreted() -> bool | None:
    """The mode the loaded kernel modules run in (None when none is loaded yet)."""
    modes = set(_loaded_mode.values())
    return modes.pop() if len(modes) == 1 else None


def check_runnable(*tensors: torch.Tensor) -> str:
    """Return "cuda" or "interpret" for the device of `tensors`, or raise `TritonUnavailable`."""
    if not triton_installed():
        raise TritonUnavailable("triton is not installed")
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise TritonUnavailable(f"tensors must share one device; got {sorted(devices)}")
    dev = devices.pop()
    interpreted = kernels_interpreted()
    if interpreted is None:
        interpreted = interpreter_enabled()
    if dev == "cuda":
        if interpreted:
            raise TritonUnavailable("the kernels were loaded for Triton's interpreter, which needs cpu tensors")
        return "cuda"
    if dev == "cpu":
        if not interpreted:
            raise TritonUnavailable(
                "cpu tensors need Triton's interpreter: call mux_kernels.load_kernels(interpret=True) "
                "(or set TRITON_INTERPRET=1) before the first kernel call"
            )
        for t in tensors:
            if t.dtype == torch.bfloat16:
                raise TritonUnavailable("bf16 is wrong in Triton's interpreter: upcast to float32 on cpu")
        return "interpret"
    raise TritonUnavailable(f"device {dev!r} is not supported; allowed: cuda, cpu (Triton interpreter)")

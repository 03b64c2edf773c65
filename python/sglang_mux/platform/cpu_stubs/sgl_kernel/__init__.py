"""CPU stand-in for SGLang's CUDA kernel package (see ../README.md).

Any attribute resolves to a function raising NotImplementedError, which makes SGLang use its torch
fallbacks. Nothing here is called on the CPU paths we run; if something is, the error names it.
"""

__version__ = "0.0.0+mux.cpu.standin"
IS_MUX_CPU_STANDIN = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available on this CPU-only install (sglang-mux CPU stand-in)"
        )

    _unavailable.__name__ = name
    return _unavailable

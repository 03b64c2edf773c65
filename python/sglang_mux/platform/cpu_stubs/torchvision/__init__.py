"""CPU stand-in for torchvision (see ../README.md): importable names, errors only on use."""

from . import io, transforms  # noqa: F401

__version__ = "0.0.0+mux.cpu.standin"
IS_MUX_CPU_STANDIN = True

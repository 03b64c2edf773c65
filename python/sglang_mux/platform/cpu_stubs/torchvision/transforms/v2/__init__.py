from ..._unavailable import module_getattr
from . import functional  # noqa: F401

__getattr__ = module_getattr("transforms.v2")

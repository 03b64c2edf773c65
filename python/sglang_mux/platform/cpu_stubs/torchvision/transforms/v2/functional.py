from ..._unavailable import module_getattr

__getattr__ = module_getattr("transforms.v2.functional")

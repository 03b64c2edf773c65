def unavailable(qualname: str):
    def _fn(*args, **kwargs):
        raise NotImplementedError(f"torchvision.{qualname} is not available on this CPU-only install")

    _fn.__name__ = qualname.rsplit(".", 1)[-1]
    return _fn


def module_getattr(prefix: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return unavailable(f"{prefix}.{name}")

    return __getattr__

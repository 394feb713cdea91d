"""Method registry: name -> Method class. A method registers itself (``@register``) next to its definition (every
module under ``fastdiff/methods/`` is imported on first lookup); its class declares its config section (``config``),
its builder (``build``) and its optional stages. Nothing outside
``fastdiff/methods/`` knows a method's name: the config, ``run``, export, CLI, server and benches look it up here.
"""

from __future__ import annotations

import importlib

_METHODS: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Register a ``Method`` subclass under ``cls.name`` (a class decorator); ``cls.config`` is its section."""
    import dataclasses

    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method needs a `name` that is an identifier, got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "config", None)):
        raise ValueError(f"method {name!r} needs `config`, the dataclass of its config section")
    _METHODS[name] = cls
    return cls


def _load_builtin() -> None:
    """Import every module and package under ``fastdiff/methods/`` once: each method registers itself there."""
    global _loaded
    if _loaded:
        return
    import pkgutil

    from .. import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")
    _loaded = True


def names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get(name: str) -> type:
    """The Method class registered as ``name``; a ConfigError lists the known names otherwise."""
    _load_builtin()
    if name not in _METHODS:
        from ..config import ConfigError

        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]

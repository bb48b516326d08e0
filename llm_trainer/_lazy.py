"""PEP 562 lazy exports: public names resolve to their module on first access, as TRL's do."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable, Callable, list[str]]:
    """Return `(__getattr__, __dir__, __all__)` for `package`, importing `.module` only when one of its names is used."""
    owner = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{owner[name]}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(owner) | set(globals()))

    return __getattr__, __dir__, sorted(owner)

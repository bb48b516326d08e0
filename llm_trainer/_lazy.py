"""PEP 562 lazy exports: public names resolve to their module on first access, as TRL's do."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, list[str]], submodules: bool | list[str] = False
) -> tuple[Callable, Callable, list[str]]:
    """Return `(__getattr__, __dir__, __all__)` for `package`, importing `.module` only when one of its names is used.

    With `submodules`, the modules named in `exports` (or, given a list, those modules) are public attributes too
    (`package.module`), as in TRL's lazy packages such as `trl.models`.
    """
    owner = {name: module for module, names in exports.items() for name in names}
    modules = list(submodules) if isinstance(submodules, list) else list(exports) if submodules else []

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f".{name}", package)  # the import also binds it on the package
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{owner[name]}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(owner) | set(modules) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, [*modules, *sorted(owner)]

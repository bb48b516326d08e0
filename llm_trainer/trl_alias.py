"""Resolve `import trl` / `from trl.x import y` to llm_trainer's twins, so an unmodified TRL script runs on llm_trainer.

`install()` puts an import hook first on `sys.meta_path`: `trl.<path>` becomes the very module object
`llm_trainer.<path>` (so `trl.SFTTrainer is llm_trainer.SFTTrainer`), and a TRL module without a twin raises an
ImportError that names it. `llm-trainer run script.py` and `python -m llm_trainer.run script.py` install it before
running the script; `pytest -p llm_trainer.trl_alias` installs it before a test session collects.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import linecache
import re
import sys
from types import ModuleType

ALIAS = "trl"
TARGET = "llm_trainer"


class MissingTwinError(ImportError):
    """A `trl` module, or a name imported from one, that llm_trainer has no twin for."""


def twin_name(fullname: str) -> str:
    """`trl.trainer.utils` -> `llm_trainer.trainer.utils`."""
    return TARGET + fullname[len(ALIAS) :]


class _TwinLoader(importlib.abc.Loader):
    """Hands the import system an already-imported llm_trainer module under its `trl` name."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return self.module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias spec onto the module; give the twin its own identity back.
        module.__spec__ = self.spec
        module.__loader__ = self.spec.loader if self.spec is not None else None


class TrlAliasFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder mapping `trl[.x.y]` onto `llm_trainer[.x.y]`."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        twin = twin_name(fullname)
        try:
            module = importlib.import_module(twin)
        except ModuleNotFoundError as error:
            if error.name is not None and twin.startswith(error.name):  # the twin itself is absent, not its import
                raise MissingTwinError(
                    f"`{fullname}` has no llm_trainer twin yet (looked for `{twin}`). Import the nearest "
                    f"llm_trainer equivalent instead, or file an issue naming `{fullname}`.",
                    name=fullname,
                ) from None
            raise
        spec = importlib.machinery.ModuleSpec(fullname, _TwinLoader(module), is_package=hasattr(module, "__path__"))
        if hasattr(module, "__path__"):
            spec.submodule_search_locations = list(module.__path__)
        return spec


_CANNOT_IMPORT = re.compile(r"cannot import name '(?P<name>[^']+)' from '(?P<module>[\w.]+)'")


def missing_name_error(error: ImportError) -> MissingTwinError | None:
    """The clearer error for `from trl[.x] import Name` when `llm_trainer[.x]` has no `Name`, else None.

    Python reports such an import against the twin (`cannot import name 'Name' from 'llm_trainer'`); this names the
    TRL object the script asked for. None when the failing import statement named llm_trainer itself, or when
    `error` is any other ImportError, so the caller re-raises it unchanged.
    """
    match = _CANNOT_IMPORT.match(str(error))
    if match is None or not (match["module"] == TARGET or match["module"].startswith(TARGET + ".")):
        return None
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is not None:  # the import statement's first line, as the script wrote it
        line = linecache.getline(frame.tb_frame.f_code.co_filename, frame.tb_lineno)
        if re.search(rf"\b{TARGET}\b", line) and not re.search(rf"\b{ALIAS}\b", line):
            return None
    module = ALIAS + match["module"][len(TARGET) :]
    return MissingTwinError(
        f"`{module}.{match['name']}` has no llm_trainer twin yet (`{match['module']}` has no `{match['name']}`). "
        f"Import the nearest llm_trainer equivalent instead, or file an issue naming `{module}.{match['name']}`.",
        name=module,
    )


def is_installed() -> bool:
    """Whether `install()` is in effect in this process."""
    return any(isinstance(finder, TrlAliasFinder) for finder in sys.meta_path)


def install() -> None:
    """Make `trl` imports resolve to llm_trainer for the rest of this process (idempotent)."""
    if is_installed():
        return
    # A real `trl` imported earlier would shadow the twins; drop it so the next import goes through the hook.
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        del sys.modules[name]
    sys.meta_path.insert(0, TrlAliasFinder())


def uninstall() -> None:
    """Undo `install()`: remove the hook and the `trl` names it bound."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, TrlAliasFinder)]
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        del sys.modules[name]


def pytest_configure(config) -> None:
    """`pytest -p llm_trainer.trl_alias`: run a TRL-based test suite against llm_trainer."""
    install()

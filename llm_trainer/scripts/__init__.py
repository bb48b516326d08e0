"""Helpers for training scripts at TRL's module path (`trl.scripts`): `TrlParser`, `ScriptArguments`, datasets."""

from .._lazy import lazy_exports

_EXPORTS = {"utils": ["DatasetMixtureConfig", "ScriptArguments", "TrlParser", "get_dataset", "init_zero_verbose"]}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

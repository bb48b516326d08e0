"""TRL's `trl.scripts` on llm_trainer: the script helpers (`TrlParser`, `ScriptArguments`, datasets) and, as
submodules, the training scripts (`sft`, `dpo`, `kto`, `reward`, `grpo`, `rloo`, `distillation`), `env` and
`vllm_serve`, each with TRL's `make_parser` / `main`."""

from .._lazy import lazy_exports

_EXPORTS = {"utils": ["DatasetMixtureConfig", "ScriptArguments", "TrlParser", "get_dataset", "init_zero_verbose"]}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, submodules=True)

"""Trainers and their configs, at TRL's module paths (`llm_trainer.trainer.sft_trainer`, ...)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "sft_config": ["SFTConfig"],
    "sft_trainer": ["SFTTrainer"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

"""Deprecated alias of the stable KTO classes, as TRL 1.16's `trl.experimental.kto`: importing works, using warns."""

import warnings
from dataclasses import dataclass

from ...trainer.kto_config import KTOConfig as _KTOConfig
from ...trainer.kto_trainer import KTOTrainer as _KTOTrainer

__all__ = ["KTOConfig", "KTOTrainer"]


@dataclass
class KTOConfig(_KTOConfig):
    """`llm_trainer.KTOConfig` under its deprecated path; warns on creation."""

    def __post_init__(self):
        warnings.warn(
            "This import path is deprecated: `KTOConfig` is stable now. Use `from llm_trainer import KTOConfig`.",
            FutureWarning,
            stacklevel=3,
        )
        super().__post_init__()


class KTOTrainer(_KTOTrainer):
    """`llm_trainer.KTOTrainer` under its deprecated path; warns on creation."""

    def __init__(self, *args, **kwargs):
        warnings.warn(
            "This import path is deprecated: `KTOTrainer` is stable now. Use `from llm_trainer import KTOTrainer`.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)

"""ORPO at TRL 1.16's import path, `trl.experimental.orpo`."""

from ...trainer.orpo_config import ORPOConfig
from ...trainer.orpo_trainer import ORPOTrainer

__all__ = ["ORPOConfig", "ORPOTrainer"]

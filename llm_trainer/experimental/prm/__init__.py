"""PRM at TRL 1.13's path, `trl.experimental.prm` (removed from TRL in 1.14)."""

from ...trainer.prm_config import PRMConfig
from ...trainer.prm_trainer import PRMTrainer

__all__ = ["PRMConfig", "PRMTrainer"]

"""CPO (with SimPO and AlphaPO) at TRL 1.16's import path, `trl.experimental.cpo`."""

from ...trainer.cpo_config import CPOConfig
from ...trainer.cpo_trainer import CPOTrainer

__all__ = ["CPOConfig", "CPOTrainer"]

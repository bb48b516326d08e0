"""XPO at TRL 1.13's path, `trl.experimental.xpo` (TRL removed it in 1.14)."""

from ...trainer.xpo_config import XPOConfig
from ...trainer.xpo_trainer import XPOTrainer

__all__ = ["XPOConfig", "XPOTrainer"]

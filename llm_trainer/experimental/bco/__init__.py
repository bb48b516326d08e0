"""BCO at TRL 1.13's path, `trl.experimental.bco` (removed from TRL in 1.14)."""

from ...trainer.bco_config import BCOConfig
from ...trainer.bco_trainer import BCOTrainer

__all__ = ["BCOConfig", "BCOTrainer"]

"""GKD at TRL 1.16's import path, `trl.experimental.gkd`."""

from ...trainer.gkd_config import GKDConfig
from ...trainer.gkd_trainer import GKDTrainer

__all__ = ["GKDConfig", "GKDTrainer"]

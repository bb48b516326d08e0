"""Nash-MD at TRL 1.13's path, `trl.experimental.nash_md` (TRL removed it in 1.14)."""

from ...trainer.nash_md_config import NashMDConfig
from ...trainer.nash_md_trainer import NashMDTrainer

__all__ = ["NashMDConfig", "NashMDTrainer"]

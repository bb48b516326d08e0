"""Online DPO at TRL 1.16's path, `trl.experimental.online_dpo`."""

from ...trainer.online_dpo_config import OnlineDPOConfig
from ...trainer.online_dpo_trainer import OnlineDPOTrainer

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer"]

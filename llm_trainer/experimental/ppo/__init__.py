"""PPO at TRL 1.12's import path, `trl.experimental.ppo` (TRL removed PPO in 1.13)."""

from ...trainer.ppo_config import PPOConfig
from ...trainer.ppo_trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]

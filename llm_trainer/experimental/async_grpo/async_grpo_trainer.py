"""TRL's module path `trl.experimental.async_grpo.async_grpo_trainer`."""

from ...trainer.async_grpo_trainer import AsyncGRPOTrainer

__all__ = ["AsyncGRPOTrainer"]

"""Asynchronous GRPO at TRL 1.16's import path, `trl.experimental.async_grpo` (built on `llm_trainer.async_rl`)."""

from ...trainer.async_grpo_config import AsyncGRPOConfig
from ...trainer.async_grpo_trainer import AsyncGRPOTrainer

__all__ = ["AsyncGRPOConfig", "AsyncGRPOTrainer"]

"""TRL's module path `trl.experimental.async_grpo.async_grpo_config`."""

from ...trainer.async_grpo_config import AsyncGRPOConfig

__all__ = ["AsyncGRPOConfig"]

"""Ready-made reward functions for `GRPOTrainer` / `RLOOTrainer`, at TRL 1.16's import path `trl.rewards`.

Each function takes `completions` (plain strings, or conversational lists of messages) and/or `completion_ids`, plus
dataset columns as keyword arguments, and returns one reward per completion (`None` skips that completion).
`math_verify` is only imported by the math rewards, when they are called (`pip install "llm-trainer[math]"`).
"""

from .accuracy_rewards import accuracy_reward, get_cosine_scaled_reward, reasoning_accuracy_reward
from .adaptive_teaching import AdaptiveTeachingReward
from .format_rewards import think_format_reward
from .other_rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

__all__ = [
    "AdaptiveTeachingReward",
    "accuracy_reward",
    "get_cosine_scaled_reward",
    "get_repetition_penalty_reward",
    "get_soft_overlong_punishment",
    "reasoning_accuracy_reward",
    "think_format_reward",
]

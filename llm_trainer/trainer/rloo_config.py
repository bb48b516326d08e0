"""Configuration for `RLOOTrainer`: the fields and defaults of TRL 1.16's `RLOOConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import option
from .online_config import OnlineRLConfig


@dataclass
class RLOOConfig(OnlineRLConfig):
    """Configuration for [`RLOOTrainer`]: REINFORCE Leave-One-Out, each completion's baseline being the mean reward of
    the other completions of its prompt.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-6`, `num_generations=2`, `beta=0.05`,
    `normalize_advantages=False`, ...); the sampling, vLLM and logging fields are shared with `GRPOConfig`.
    """

    _algorithm = "RLOO"

    num_generations: int | None = option(
        2, "Completions sampled per prompt (at least 2); the generation batch must be a multiple."
    )
    beta: float = option(
        0.05, "KL coefficient against the reference model, folded into the reward; 0 loads no reference."
    )
    normalize_advantages: bool = option(False, "Standardize advantages over each generation batch (mean 0, std 1).")
    reward_clip_range: tuple[float, float] | None = option(
        None, "Clamp rewards into (min, max) before computing advantages; None leaves them as they are."
    )

    def __post_init__(self):
        super().__post_init__()
        clip = self.reward_clip_range
        if clip is not None and (isinstance(clip, str) or len(clip) != 2 or clip[0] > clip[1]):
            raise ValueError(f"`reward_clip_range` must be a (min, max) pair with min <= max, got {clip!r}.")

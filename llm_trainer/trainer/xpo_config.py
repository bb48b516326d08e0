"""Configuration for `XPOTrainer`: TRL 1.13's `XPOConfig` (Online DPO's fields plus `alpha`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import option
from .online_dpo_config import OnlineDPOConfig
from .online_pairs import normalize_schedule


@dataclass
class XPOConfig(OnlineDPOConfig):
    """Configuration for [`XPOTrainer`]: every `OnlineDPOConfig` field, plus `alpha`, the weight of the exploration
    bonus (a list gives one value per epoch, the last one for later epochs; default `[1e-5]`, as in TRL 1.13)."""

    _algorithm = "XPO"

    alpha: list[float] = option(
        [1e-5],
        "Weight of the XPO exploration bonus; a list gives one value per epoch (the last for later epochs).",
    )

    def __post_init__(self):
        if isinstance(self.alpha, int | float) and not isinstance(self.alpha, bool):
            self.alpha = [self.alpha]  # a number is accepted, as TRL does
        super().__post_init__()
        normalize_schedule(self, "alpha", 0.0)

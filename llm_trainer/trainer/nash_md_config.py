"""Configuration for `NashMDTrainer`: TRL 1.13's `NashMDConfig` (Online DPO's fields plus `mixture_coef`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import option
from .online_dpo_config import OnlineDPOConfig
from .online_pairs import normalize_schedule


@dataclass
class NashMDConfig(OnlineDPOConfig):
    """Configuration for [`NashMDTrainer`]: every `OnlineDPOConfig` field, plus `mixture_coef`, the weight of the
    reference in the geometric mixture the second completion is sampled from (in [0, 1]; a list gives one value per
    epoch, the last one for later epochs; default `[0.5]`, as in TRL 1.13). `loss_type` is not used: Nash-MD has
    one loss."""

    _algorithm = "Nash-MD"

    mixture_coef: list[float] = option(
        [0.5],
        "Weight of the reference policy in the geometric mixture the second completion is sampled from, in [0, 1]; "
        "a list gives one value per epoch (the last for later epochs).",
    )

    def __post_init__(self):
        if isinstance(self.mixture_coef, int | float) and not isinstance(self.mixture_coef, bool):
            self.mixture_coef = [self.mixture_coef]  # a number is accepted, as TRL does
        super().__post_init__()
        normalize_schedule(self, "mixture_coef", 0.0, 1.0)

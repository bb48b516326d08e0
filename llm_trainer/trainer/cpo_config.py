"""Configuration for `CPOTrainer`: the fields and defaults of TRL 1.16's `trl.experimental.cpo.CPOConfig`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .base_config import option
from .reference_free_config import ReferenceFreeConfig

logger = logging.getLogger(__name__)

CPO_CONFIG_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


@dataclass
class CPOConfig(ReferenceFreeConfig):
    """Configuration for [`CPOTrainer`]: CPO (https://huggingface.co/papers/2401.08417), SimPO and AlphaPO.

    Field names and defaults are TRL 1.16's: `learning_rate=1e-6`, `beta=0.1`, `loss_type="sigmoid"`,
    `cpo_alpha=1.0`, `simpo_gamma=0.5`, `alpha=0.0`. `loss_type="alphapo"` is shorthand for `loss_type="simpo"` with
    `cpo_alpha=0.0` (set `alpha` too); every other argument is a `transformers.TrainingArguments` field.
    """

    label_smoothing: float = option(
        0.0, "Probability that a preference label is flipped (conservative loss); sigmoid and simpo only."
    )
    loss_type: str = option(
        "sigmoid",
        "'sigmoid' (CPO), 'hinge' (SLiC), 'ipo', 'simpo' or 'alphapo' (simpo with `cpo_alpha=0`).",
        choices=list(CPO_CONFIG_LOSS_TYPES),
    )
    cpo_alpha: float = option(1.0, "Weight of the NLL (behaviour cloning) term.")
    simpo_gamma: float = option(0.5, "Target reward margin γ of the SimPO loss (`loss_type='simpo'` only).")
    alpha: float = option(
        0.0,
        "AlphaPO reward shape for every loss type: r = (1 - p^(-alpha)) / alpha of the completion probability p; 0 "
        "uses the log-probability itself.",
    )

    def __post_init__(self):
        if self.loss_type == "alphapo":  # TRL's shorthand
            self.loss_type = "simpo"
            self.cpo_alpha = 0.0
        super().__post_init__()
        if self.loss_type == "kto_pair":
            raise ValueError("`loss_type='kto_pair'` was removed from CPO; use `KTOTrainer` for KTO.")
        if self.loss_type not in CPO_CONFIG_LOSS_TYPES:
            raise ValueError(
                f"Unknown `loss_type` {self.loss_type!r}; choose one of {', '.join(CPO_CONFIG_LOSS_TYPES)}."
            )
        if self.loss_type in ("ipo", "simpo") and self.beta == 0:
            raise ValueError(f"`loss_type={self.loss_type!r}` divides by `beta`; set `beta` > 0 (e.g. 0.1).")
        if not 0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"`label_smoothing` must be in [0, 0.5], got {self.label_smoothing}.")
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing > 0:
            logger.warning(
                "`label_smoothing` is ignored by the %s loss; set it to 0.0 to silence this warning.", self.loss_type
            )

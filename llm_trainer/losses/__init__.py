"""Loss maths as pure functions of tensors: no trainer, model or dataset in sight.

| Trainer (TRL)              | Functions                                                                       |
|----------------------------|---------------------------------------------------------------------------------|
| DPOTrainer                 | `dpo_loss`, `dpo_sequence_logps` (LD-DPO), `wpo_weights`, `preference_metrics` |
| KTOTrainer                 | `kto_kl`, `kto_loss`, `unpaired_metrics`                                       |
| BCOTrainer (TRL <= 1.13)   | `RunningMoments`, `bco_loss`, `density_ratio_weights` (UDM)                    |
| ORPOTrainer (experimental) | `odds_ratio_loss`, `preference_metrics`                                        |
| CPOTrainer (experimental)  | `cpo_loss` (sigmoid, hinge, ipo, SimPO, AlphaPO), `preference_metrics`          |
| RewardTrainer              | `reward_model_loss`, `reward_model_metrics`                                    |
| PRMTrainer (TRL <= 1.13)   | none: token-classification cross-entropy computed by the model                  |

Shared: `sequence_logps`, `masked_mean_nll` and the loss shapes in `common`.
"""

from .common import Gather, masked_mean_nll, preference_metrics, sequence_logps
from .preference import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    DPOLossOutput,
    check_dpo_options,
    dpo_loss,
    dpo_sequence_logps,
    f_divergence_scores,
    wpo_weights,
)
from .reference_free import (
    CPO_LOSS_TYPES,
    CPOLossOutput,
    ORPOLossOutput,
    alphapo_reward,
    cpo_loss,
    log1mexp,
    odds_ratio_loss,
)
from .reward import reward_model_loss, reward_model_metrics
from .unpaired import (
    KTO_LOSS_TYPES,
    BCOLossOutput,
    RunningMoments,
    UnpairedLossOutput,
    bco_loss,
    density_ratio_weights,
    kto_kl,
    kto_loss,
    unpaired_metrics,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "BCOLossOutput",
    "CPOLossOutput",
    "DPOLossOutput",
    "Gather",
    "ORPOLossOutput",
    "RunningMoments",
    "UnpairedLossOutput",
    "alphapo_reward",
    "bco_loss",
    "check_dpo_options",
    "cpo_loss",
    "density_ratio_weights",
    "dpo_loss",
    "dpo_sequence_logps",
    "f_divergence_scores",
    "kto_kl",
    "kto_loss",
    "log1mexp",
    "masked_mean_nll",
    "odds_ratio_loss",
    "preference_metrics",
    "reward_model_loss",
    "reward_model_metrics",
    "sequence_logps",
    "unpaired_metrics",
    "wpo_weights",
]

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
| GRPOTrainer                | `group_advantages`, `grpo_loss`, `vllm_importance_sampling_ratio`,              |
|                            | `high_entropy_mask`, `off_policy_mask`, `vespo_gamma_weights`, `entropy_bonus`  |
| RLOOTrainer                | `rloo_sequence_kl`, `rloo_rewards`, `rloo_advantages`, `zero_std_groups`,       |
|                            | `rloo_loss`                                                                     |
| XPOTrainer (TRL <= 1.13)   | `xpo_loss`                                                                      |
| NashMDTrainer (TRL <= 1.13)| `nash_md_loss`                                                                  |
| DistillationTrainer        | `generalized_jsd`, `chunked_distillation_loss`, `transform_logits`              |
| PPOTrainer (TRL <= 1.12)   | `kl_shaped_rewards`, `whiten_rewards`, `gae_advantages`, `ppo_policy_loss`,     |
|                            | `ppo_value_loss`, `masked_whiten`, `response_padding_masks`                     |

Shared: `sequence_logps`, `masked_mean_nll` and the loss shapes in `common`; for GRPO and RLOO metrics,
`clip_metrics`, `masked_sum_count`, `reduce_metrics` and TRL's `nanstd` / `nanmin` / `nanmax`.
"""

from .common import Gather, masked_mean_nll, preference_metrics, sequence_logps
from .distillation import chunked_distillation_loss, generalized_jsd, transform_logits
from .online_preference import nash_md_loss, xpo_loss
from .policy_gradient import (
    GRPO_LOSS_TYPES,
    PolicyLossOutput,
    clip_metrics,
    entropy_bonus,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    masked_sum_count,
    nanmax,
    nanmin,
    nanstd,
    off_policy_mask,
    reduce_metrics,
    rloo_advantages,
    rloo_loss,
    rloo_rewards,
    rloo_sequence_kl,
    vespo_gamma_weights,
    vllm_importance_sampling_ratio,
    zero_std_groups,
)
from .ppo import (
    INVALID_LOGPROB,
    PPO_KL_ESTIMATORS,
    KLRewardOutput,
    PPOPolicyLossOutput,
    first_true_indices,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_padding_masks,
    whiten_rewards,
)
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
    "nash_md_loss",
    "xpo_loss",
    "chunked_distillation_loss",
    "generalized_jsd",
    "transform_logits",
    "BCOLossOutput",
    "CPOLossOutput",
    "CPO_LOSS_TYPES",
    "DPOLossOutput",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "GRPO_LOSS_TYPES",
    "Gather",
    "INVALID_LOGPROB",
    "KLRewardOutput",
    "KTO_LOSS_TYPES",
    "ORPOLossOutput",
    "PPOPolicyLossOutput",
    "PPO_KL_ESTIMATORS",
    "PolicyLossOutput",
    "RunningMoments",
    "UnpairedLossOutput",
    "alphapo_reward",
    "bco_loss",
    "check_dpo_options",
    "clip_metrics",
    "cpo_loss",
    "density_ratio_weights",
    "dpo_loss",
    "dpo_sequence_logps",
    "entropy_bonus",
    "f_divergence_scores",
    "first_true_indices",
    "gae_advantages",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "kl_shaped_rewards",
    "kto_kl",
    "kto_loss",
    "log1mexp",
    "masked_mean",
    "masked_mean_nll",
    "masked_sum_count",
    "masked_var",
    "masked_whiten",
    "nanmax",
    "nanmin",
    "nanstd",
    "odds_ratio_loss",
    "off_policy_mask",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
    "reduce_metrics",
    "response_padding_masks",
    "reward_model_loss",
    "reward_model_metrics",
    "rloo_advantages",
    "rloo_loss",
    "rloo_rewards",
    "rloo_sequence_kl",
    "sequence_logps",
    "unpaired_metrics",
    "vespo_gamma_weights",
    "vllm_importance_sampling_ratio",
    "whiten_rewards",
    "wpo_weights",
    "zero_std_groups",
]

"""Bradley–Terry reward-model loss and metrics, as TRL 1.16's `RewardTrainer.compute_loss`.

Process reward models (TRL ≤ 1.13 `PRMTrainer`) need no loss here: they train with the token-classification
cross-entropy that `AutoModelForTokenClassification` computes from `labels` (−100 everywhere but each step's last
token, which carries the step's 0/1 label).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Gather, _identity


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """mean(−logσ(r_c − r_r − m)) + η·mean((r_c + r_r)²).

    r_c, r_r are the scalar rewards of each pair, shape [B]; m the optional per-pair `margin`; η the optional
    `center_rewards_coefficient` (Eisenstein et al., 2023), which pulls each pair's reward sum towards zero.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


@torch.no_grad()
def reward_model_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, gather: Gather | None = None
) -> dict[str, float]:
    """`{min,mean,max}_reward` over every gathered reward; `accuracy` = mean(r_c > r_r) and `margin` = mean(r_c −
    r_r), each averaged per process, then over processes."""
    gather = gather or _identity
    all_rewards = gather(torch.cat((chosen_rewards, rejected_rewards)))
    return {
        "min_reward": all_rewards.min().item(),
        "mean_reward": all_rewards.mean().item(),
        "max_reward": all_rewards.max().item(),
        "accuracy": gather((chosen_rewards > rejected_rewards).float().mean()).mean().item(),
        "margin": gather((chosen_rewards - rejected_rewards).mean()).mean().item(),
    }

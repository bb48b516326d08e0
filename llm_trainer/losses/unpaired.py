"""Losses on unpaired (desirable / undesirable) completions: KTO (TRL 1.16 `KTOTrainer`) and BCO (TRL 1.13
`experimental.bco`, the last release that shipped it).

c and r are the log-ratios logπ(y) − logπ_ref(y) of the desirable and undesirable completions of a batch; their
counts may differ, and either may be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import Gather, _identity

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class UnpairedLossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar nanmean over the weighted per-completion losses (NaN when the batch is empty)."""
    chosen_rewards: torch.Tensor
    """β·c, detached."""
    rejected_rewards: torch.Tensor
    """β·r, detached."""


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """KTO's reference point z = max(0, mean over processes of mean(logπ(y'|x) − logπ_ref(y'|x))), detached.

    y' are the mismatched completions (each prompt paired with a neighbour's completion). Each process averages its
    own batch; `gather` (`accelerator.gather_for_metrics`) collects those means, which are averaged and clamped.
    """
    local_mean = (kl_logps - ref_kl_logps).mean().detach()
    return (gather or _identity)(local_mean).mean().clamp(min=0)


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    kl: torch.Tensor | float | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedLossOutput:
    """KTO loss: nanmean(cat(λ_D·ℓ_c, λ_U·ℓ_r)) over the desirable and undesirable completions.

    - kto: ℓ_c = 1 − σ(β(c − z)), ℓ_r = 1 − σ(β(z − r)), with z = `kl` from `kto_kl`.
    - apo_zero_unpaired: ℓ_c = 1 − σ(βc), ℓ_r = σ(βr); no reference point.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}. Valid loss types: {', '.join(KTO_LOSS_TYPES)}.")
    if loss_type == "kto" and kl is None:
        raise ValueError("The 'kto' loss needs `kl`, the reference point from `kto_kl`.")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), dim=0)
    return UnpairedLossOutput(losses.nanmean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def unpaired_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    gather: Gather | None = None,
) -> dict[str, float]:
    """KTO's `rewards/*` and `logps/*` metrics: gathered nansum / gathered count, per side.

    A side with no completion anywhere is left out, and `rewards/margins` (chosen − rejected) needs both sides.
    """
    gather = gather or _identity
    metrics: dict[str, float] = {}
    for side, rewards, logps in (
        ("chosen", chosen_rewards, chosen_logps),
        ("rejected", rejected_rewards, rejected_logps),
    ):
        count = gather(torch.tensor(rewards.numel(), device=rewards.device)).sum().item()
        if count > 0:
            metrics[f"rewards/{side}"] = gather(rewards.detach().nansum()).nansum().item() / count
            metrics[f"logps/{side}"] = gather(logps.detach().nansum()).nansum().item() / count
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


@dataclass
class RunningMoments:
    """Running mean / variance of a stream (Chan et al.'s parallel update), BCO's reward shift δ.

    The trainer owns it and saves its fields with its checkpoints (TRL writes them to `running.json`). Arithmetic is
    TRL 1.13's: batch moments in float32, the running state in Python floats, the count starting at 1e-24.
    """

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor, reduce_sum: Gather | None = None) -> None:
        """Fold in a batch. With several processes pass `reduce_sum` (`lambda t: accelerator.reduce(t, "sum")`),
        so the batch moments are the global ones."""
        if reduce_sum is None:
            batch_count = xs.numel()
            batch_var, batch_mean = torch.var_mean(xs, unbiased=False)
        else:
            total, batch_count = reduce_sum(
                torch.stack([xs.sum(), torch.tensor(xs.numel(), dtype=xs.dtype, device=xs.device)])
            )
            batch_mean = total / batch_count
            batch_var = reduce_sum(((xs - batch_mean) ** 2).sum()) / batch_count
            batch_count = batch_count.item()
        batch_mean, batch_var = batch_mean.float(), batch_var.float()

        shift = batch_mean - self.mean
        total_count = self.count + batch_count
        # Sum of squared deviations of the old data about the new mean, plus the batch's own
        old_sum = self.var * self.count + shift**2 * self.count * batch_count / total_count
        new_var = (old_sum + batch_var * batch_count) / total_count
        self.mean += (shift * batch_count / total_count).item()
        self.std = (new_var * total_count / (total_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = total_count


def density_ratio_weights(
    prob_desirable: torch.Tensor, min_ratio: float = 0.5, max_ratio: float = 10.0
) -> torch.Tensor:
    """BCO's underlying-distribution-matching (UDM) weights for undesirable completions: the density ratio
    p/(1 − p + 1e-8) clamped to [min_ratio, max_ratio], p being a prompt classifier's P(desirable | prompt)."""
    return (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(min=min_ratio, max=max_ratio)


class BCOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar nanmean over the per-completion losses."""
    chosen_rewards: torch.Tensor
    """β·c, detached."""
    rejected_rewards: torch.Tensor
    """β·r, detached."""
    delta: torch.Tensor
    """The reward shift δ used (the running mean), logged as `delta`."""


def bco_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    running: RunningMoments,
    *,
    beta: float = 0.1,
    update_running: bool = True,
    rejected_weights: torch.Tensor | None = None,
    reduce_sum: Gather | None = None,
) -> BCOLossOutput:
    """BCO loss: nanmean(cat(−logσ(βc − δ), w·(−logσ(−(βr − δ))))).

    δ is the running mean of all rewards βc, βr seen so far, this batch included: when `update_running` (training
    steps) `running` is first updated in place with this batch's rewards (`reduce_sum` as in `RunningMoments.update`);
    evaluation passes `update_running=False`. w are the UDM `density_ratio_weights` (1 when None).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    if update_running:
        running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach(), reduce_sum)
    delta = torch.as_tensor(running.mean, device=chosen_rewards.device)

    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    if rejected_weights is not None:
        rejected_losses = rejected_weights * rejected_losses
    losses = torch.cat((chosen_losses, rejected_losses), dim=0)
    return BCOLossOutput(losses.nanmean(), chosen_rewards.detach(), rejected_rewards.detach(), delta)

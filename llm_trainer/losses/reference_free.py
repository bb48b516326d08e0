"""Preference losses without a reference model: ORPO and CPO (with SimPO and AlphaPO), as TRL 1.16's
`trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` and `trl.experimental.cpo.CPOTrainer.cpo_loss`.

Inputs are the policy's sequence log-probs ℓ_c, ℓ_r of the chosen and rejected completions, shape [B]. Which
reduction the trainer feeds matters: ORPO uses the per-token average, CPO the sum for `sigmoid`/`hinge` and the
average for `ipo`/`simpo` (`sequence_logps(..., average=loss_type in ("ipo", "simpo"))`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import hinge_loss, ipo_loss, smoothed_sigmoid_loss

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar nll_loss − β·mean(logσ(log_odds))."""
    chosen_rewards: torch.Tensor
    """β·ℓ_c, detached."""
    rejected_rewards: torch.Tensor
    """β·ℓ_r, detached."""
    log_odds_ratio: torch.Tensor
    """mean(logσ(log_odds)), detached: the `log_odds_ratio` metric."""
    log_odds_chosen: torch.Tensor
    """mean(log_odds), detached: the `log_odds_chosen` metric."""


def odds_ratio_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll_loss: torch.Tensor, *, beta: float = 0.1
) -> ORPOLossOutput:
    """ORPO: nll_loss − β·mean(logσ(log_odds)), log_odds = (ℓ_c − ℓ_r) − (log(1 − e^ℓ_c) − log(1 − e^ℓ_r)).

    ℓ are average per-token log-probs; `nll_loss` is the token-mean NLL of the chosen prompt + completion (ORPO
    trains on the prompt too). β is the paper's λ. Computed in at least float32.
    """
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    chosen_logps, rejected_logps = chosen_logps.to(dtype), rejected_logps.to(dtype)
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        nll_loss - (beta * log_sigmoid_odds).mean(),
        beta * chosen_logps.detach(),
        beta * rejected_logps.detach(),
        log_sigmoid_odds.detach().mean(),
        log_odds.detach().mean(),
    )


class CPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar mean(loss) + cpo_alpha·nll_loss."""
    chosen_rewards: torch.Tensor
    """β·u(ℓ_c), detached."""
    rejected_rewards: torch.Tensor
    """β·u(ℓ_r), detached."""


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape u(ℓ) = (1 − p^(−α))/α with p = e^ℓ; u(ℓ) = ℓ for α = 0.

    Evaluated as −expm1(−αℓ)/α, which equals TRL's `(1 - exp(ℓ).pow(-α))/α` but stays finite where e^ℓ underflows.
    """
    return logps if alpha == 0.0 else -torch.expm1(-alpha * logps) / alpha


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
) -> CPOLossOutput:
    """CPO family: mean(loss(x)) + cpo_alpha·nll_loss, with x = u(ℓ_c) − u(ℓ_r) (u from `alphapo_reward`).

    - sigmoid: −(1−ε)logσ(βx) − ε·logσ(−βx)           - hinge: relu(1 − βx)
    - ipo: (x − 1/(2β))²                                - simpo: sigmoid on x − γ/β (γ = `simpo_gamma`)

    ε = `label_smoothing` (ignored by hinge and ipo). `nll_loss` is the token-mean NLL of the chosen completion; it
    may be None when `cpo_alpha` is 0. AlphaPO is `loss_type="simpo"`, `alpha` ≠ 0, `cpo_alpha=0` (what TRL's
    `CPOConfig` turns `loss_type="alphapo"` into).
    """
    if loss_type not in CPO_LOSS_TYPES:
        hint = (
            " For AlphaPO pass loss_type='simpo', cpo_alpha=0.0 and a non-zero alpha."
            if loss_type == "alphapo"
            else ""
        )
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}. Valid loss types: {', '.join(CPO_LOSS_TYPES)}.{hint}")
    if cpo_alpha != 0 and nll_loss is None:
        raise ValueError(f"`cpo_alpha={cpo_alpha}` weights the NLL term, so `nll_loss` is required.")
    chosen_rewards = alphapo_reward(chosen_logps, alpha)
    rejected_rewards = alphapo_reward(rejected_logps, alpha)
    logits = chosen_rewards - rejected_rewards
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = smoothed_sigmoid_loss(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = hinge_loss(beta * logits)
    else:
        losses = ipo_loss(logits, beta)
    loss = losses.mean() if cpo_alpha == 0 else losses.mean() + cpo_alpha * nll_loss
    return CPOLossOutput(loss, beta * chosen_rewards.detach(), beta * rejected_rewards.detach())

"""Losses of the online preference trainers that pit the policy against a second sampler: XPO (the reference
policy's completion, plus an exploration bonus) and Nash-MD (a completion of the policy/reference geometric mixture,
scored by a preference probability)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def xpo_loss(
    policy_logps_policy: torch.Tensor,
    policy_logps_ref: torch.Tensor,
    ref_logps_policy: torch.Tensor,
    ref_logps_ref: torch.Tensor,
    policy_chosen: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XPO's per-pair loss: the Online DPO loss on (policy completion, reference completion), chosen by
    `policy_chosen`, plus `alpha` times the policy's log-prob of the reference completion.

    Args are sequence log-probs of shape (B,): `policy_logps_policy` is the policy's log-prob of its own completion,
    `policy_logps_ref` the policy's of the reference's completion, `ref_logps_*` the reference policy's of the same.
    Returns (loss, dpo_loss, xpo_loss), each (B,).
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}.")
    policy_ratio = policy_logps_policy - ref_logps_policy
    ref_ratio = policy_logps_ref - ref_logps_ref
    logits = torch.where(policy_chosen, policy_ratio - ref_ratio, ref_ratio - policy_ratio)
    if loss_type == "sigmoid":
        dpo = -F.logsigmoid(beta * logits)
    else:
        dpo = (logits - 1 / (2 * beta)) ** 2
    bonus = alpha * policy_logps_ref
    return dpo + bonus, dpo, bonus


def nash_md_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    probability: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nash-MD's per-sequence loss on the policy's completions: a REINFORCE term with the probability that the
    policy's completion beats the mixture's (0.5 as the control variate), plus `beta` times a REINFORCE estimate of
    the KL to the reference.

    `policy_logps` (with gradient) and `ref_logps` are per-token log-probs (B, T) of the policy's completions, `mask`
    their completion mask, `probability` (B,) the preference probability. Returns (loss, score, kl), each (B,);
    `kl` is the detached sequence log-ratio.
    """
    mask = mask.to(policy_logps.dtype)
    policy_logps, ref_logps = policy_logps * mask, ref_logps * mask
    score = (probability - 0.5) * policy_logps.sum(1)
    log_ratio = (policy_logps - ref_logps).detach()
    kl_term = (log_ratio * policy_logps).sum(1)
    return beta * kl_term - score, score, log_ratio.sum(1)

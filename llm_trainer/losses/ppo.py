"""PPO loss maths (Ziegler et al., 2019 / Stiennon et al., 2020) as TRL ≤ 1.12's `PPOTrainer` computes it.

Shapes: per-token tensors are `[batch, response_length]` over the response tokens only. Two masks describe a
batch, both True on *padding* (as TRL's `padding_mask` / `padding_mask_p1`), built by `response_padding_masks` from
the index of each response's last token:

- `padding_mask`: positions after the last token. Log-probs, KL and advantages live outside it.
- `padding_mask_p1`: positions more than one past the last token. Values and returns live outside it: the
  sequence score is credited one step after the last token (see `kl_shaped_rewards`), so the value of that step is
  learned too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels import kl_penalty

INVALID_LOGPROB = 1.0
"""What TRL writes into padded log-prob positions; equal on both sides of a ratio, it makes the log-ratio 0."""
PPO_KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (over `axis`, or all elements)."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is true, with Bessel's correction when `unbiased`."""
    variance = masked_mean((values - masked_mean(values, mask)).square(), mask)
    if not unbiased:
        return variance
    count = mask.sum()
    if count < 2:
        raise ValueError(
            f"The masked variance needs at least 2 unmasked values, got {int(count)}: there are too few response "
            "tokens in the batch. Raise `per_device_train_batch_size`, `gradient_accumulation_steps` or "
            "`response_length`."
        )
    return variance * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`(values − mean) / sqrt(var + 1e-8)` with masked statistics; the mean is added back unless `shift_mean`."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last axis, or the axis length where a row has none."""
    length = bools.size(-1)
    positions = torch.arange(length, device=bools.device)
    return torch.where(bools, positions, length).min(-1).values


def response_padding_masks(sequence_lengths: torch.Tensor, response_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(padding_mask, padding_mask_p1)` (True on padding, see the module docstring) for responses whose last token
    sits at index `sequence_lengths` (−1 for an empty response)."""
    positions = torch.arange(response_length, device=sequence_lengths.device).unsqueeze(0)
    last = sequence_lengths.unsqueeze(1)
    return positions > last, positions > last + 1


class KLRewardOutput(NamedTuple):
    rewards: torch.Tensor
    """−kl_coef·kl per token, plus the score at the scored position; `[B, T]`."""
    kl: torch.Tensor
    """Per-token KL estimate, 0 on padding; `[B, T]`."""
    non_score_reward: torch.Tensor
    """−kl_coef·kl; `[B, T]`."""


def kl_shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    sequence_lengths: torch.Tensor,
    padding_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> KLRewardOutput:
    """Per-token RLHF reward: a KL penalty on every token, plus the sequence score at one position.

    r_t = −kl_coef·kl_t, with kl_t = logπ − logπ_ref ("k1") or e^(logπ_ref − logπ) − 1 − (logπ_ref − logπ) ("k3"),
    0 on padding; then `scores[i]` is added at `sequence_lengths[i] + 1` (the step after the last token), or at
    `sequence_lengths[i]` when the response fills the whole width.

    Args:
        logprobs, ref_logprobs: sampled-token log-probs of the rollout policy and the reference, `[B, T]`.
        scores: reward-model score of each response, `[B]`.
        sequence_lengths: index of each response's last token, `[B]`.
        padding_mask: True on padding, `[B, T]` (see `response_padding_masks`).
        kl_coef: weight of the KL penalty.
        kl_estimator: "k1" or "k3".
    """
    if kl_estimator not in PPO_KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator must be 'k1' (unbiased) or 'k3' (unbiased, lower variance), got {kl_estimator!r}. See "
            "http://joschu.net/blog/kl-approx.html."
        )
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator).masked_fill(padding_mask, 0.0)
    non_score_reward = -kl_coef * kl
    width = logprobs.size(1)
    scored_at = torch.where(sequence_lengths + 1 < width, sequence_lengths + 1, sequence_lengths)
    rows = torch.arange(logprobs.size(0), device=logprobs.device)
    rewards = non_score_reward.clone()
    rewards[rows, scored_at] += scores.to(rewards.dtype)
    return KLRewardOutput(rewards, kl, non_score_reward)


def whiten_rewards(rewards: torch.Tensor, padding_mask_p1: torch.Tensor) -> torch.Tensor:
    """Rewards scaled to unit variance over the valid positions (mean kept), 0 beyond them (`whiten_rewards=True`)."""
    return masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens.

    δ_t = r_t + γ·V_{t+1} − V_t (V past the last column is 0), A_t = δ_t + γλ·A_{t+1}, returns R_t = A_t + V_t.
    The advantages are then whitened over the valid tokens and set to 0 on padding; the returns are not.

    Args:
        rewards: per-token rewards, `[B, T]` (see `kl_shaped_rewards`).
        values: value predictions of the rollout, 0 on `padding_mask_p1`, `[B, T]`.
        padding_mask: True on padding, `[B, T]`.
        gamma, lam: discount γ and GAE λ.

    Returns:
        `(advantages, returns)`, both `[B, T]`.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.size(1) - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0.0)
    return advantages, returns


class PPOPolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    """Clipped surrogate loss, the mean over valid tokens of max(−A·ρ, −A·clip(ρ, 1 ± ε))."""
    clipfrac: torch.Tensor
    """Fraction of valid tokens where the clipped term is the larger one (detached)."""
    approxkl: torch.Tensor
    """½·mean((logπ − logπ_old)²) over every position, padding counting as 0 (detached)."""
    ratio: torch.Tensor
    """Mean ratio ρ over every position, padding counting as 1 (detached)."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    padding_mask: torch.Tensor,
    cliprange: float,
) -> PPOPolicyLossOutput:
    """PPO's clipped policy objective, as a loss, with TRL's statistics.

    Args:
        logprobs: current policy's sampled-token log-probs, `[B, T]` (differentiable).
        old_logprobs: the rollout policy's, `[B, T]`.
        advantages: `[B, T]` (see `gae_advantages`).
        padding_mask: True on padding, `[B, T]`.
        cliprange: ε; the ratio is clipped to [1 − ε, 1 + ε].
    """
    valid = ~padding_mask
    log_ratio = (logprobs - old_logprobs).masked_fill(padding_mask, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), valid)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), valid)
        approxkl = 0.5 * log_ratio.square().mean()
    return PPOPolicyLossOutput(loss, clipfrac, approxkl, ratio.detach().mean())


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    padding_mask_p1: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ½·mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²)) over the valid positions.

    Args:
        values: current value predictions, `[B, T]` (differentiable).
        old_values: the rollout's value predictions, `[B, T]`.
        returns: GAE returns, `[B, T]`.
        padding_mask_p1: True where values are not trained, `[B, T]`.
        cliprange_value: ε_v.

    Returns:
        `(loss, clipfrac)`, clipfrac (detached) the fraction of valid positions where the clipped error is larger.
    """
    valid = ~padding_mask_p1
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), valid)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), valid)
    return loss, clipfrac

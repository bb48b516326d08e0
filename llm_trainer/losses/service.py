"""Losses of the remote training service (`llm-trainer train-serve`), with Tinker's semantics.

Every loss is a plain sum over the target tokens of every datum: no mean is taken on the server. The client chooses
the normalisation through the per-token `weights` (cross-entropy) or `advantages` (policy gradient): divide them by
the batch's token count to get a token mean, as SFT and GRPO's `dapo` loss use.

Inputs are per-token tensors of equal shape (one datum's targets, or several data concatenated): `logprobs` are the
trained policy's log-probabilities of the target tokens (with gradient), `sampling_logprobs` those of the sampler
that produced them (the `logprobs` loss input).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SERVICE_LOSSES = ("cross_entropy", "importance_sampling", "ppo")
"""Loss names `forward_backward` accepts."""

LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
"""The `loss_fn_inputs` each loss needs (all per target token)."""

PPO_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
"""`loss_fn_config` keys of `ppo` and their defaults: the ratio is clamped to [low, high]."""


def cross_entropy_loss(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ −logp·w: weighted negative log-likelihood (weights 0 on prompt tokens, 1/N for a token mean)."""
    return -(logprobs * weights).sum()


def importance_sampling_loss(
    logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """Σ −exp(logp − logp_sampler)·A: REINFORCE with a per-token importance ratio for off-policy samples (its value is
    −ΣA on-policy, its gradient −Σ A·∇logp)."""
    return -(torch.exp(logprobs - sampling_logprobs) * advantages).sum()


def ppo_loss(
    logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low_threshold: float = 0.8,
    clip_high_threshold: float = 1.2,
) -> torch.Tensor:
    """Σ −min(r·A, clamp(r, low, high)·A) with r = exp(logp − logp_sampler): PPO's clipped surrogate per token.

    `clip_low_threshold`/`clip_high_threshold` bound the ratio itself (Tinker's 0.8 and 1.2 are GRPO's ε = 0.2)."""
    if not 0.0 <= clip_low_threshold <= 1.0 <= clip_high_threshold:
        raise ValueError(
            f"ppo needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold, got {clip_low_threshold} and "
            f"{clip_high_threshold}"
        )
    ratio = torch.exp(logprobs - sampling_logprobs)
    clipped = ratio.clamp(clip_low_threshold, clip_high_threshold)
    return -torch.min(ratio * advantages, clipped * advantages).sum()


def check_loss_config(loss_fn: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """`config` with the loss's defaults filled in; ValueError for an unknown loss, key or clip range."""
    if loss_fn not in LOSS_INPUTS:
        raise ValueError(f"loss_fn must be one of {', '.join(SERVICE_LOSSES)}, got {loss_fn!r}")
    config = dict(config or {})
    allowed = PPO_DEFAULTS if loss_fn == "ppo" else {}
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"loss_fn_config keys {unknown} are not options of {loss_fn!r} (it takes {sorted(allowed)})")
    if loss_fn == "ppo":
        config = {**PPO_DEFAULTS, **config}
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        if not 0.0 <= low <= 1.0 <= high:
            raise ValueError(f"ppo needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold, got {low} and {high}")
    return config


def service_loss(
    loss_fn: str,
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """The loss `loss_fn` of `logprobs` given the datum's `loss_fn_inputs` (`inputs`) and `loss_fn_config` (`config`).

    Raises ValueError naming the loss, the missing input or the unknown config key.
    """
    config = check_loss_config(loss_fn, config)
    missing = [name for name in LOSS_INPUTS[loss_fn][1:] if name not in inputs]
    if missing:
        raise ValueError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {missing} (per target token)")
    dtype = logprobs.dtype
    if loss_fn == "cross_entropy":
        return cross_entropy_loss(logprobs, inputs["weights"].to(dtype))
    sampling, advantages = inputs["logprobs"].to(dtype), inputs["advantages"].to(dtype)
    if loss_fn == "importance_sampling":
        return importance_sampling_loss(logprobs, sampling, advantages)
    return ppo_loss(logprobs, sampling, advantages, **config)

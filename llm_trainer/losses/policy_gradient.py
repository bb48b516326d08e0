"""Policy-gradient losses for GRPO and RLOO, as TRL 1.16's `GRPOTrainer` and `RLOOTrainer` compute them.

Notation: r = π/π_old is the importance ratio (per token, or per sequence with `importance_sampling_level="sequence"`,
where log r is the masked mean of the token log-ratios), A the advantage, ε_lo/ε_hi the clipping range, m the
completion mask. `per_token_logps` follow the package convention (shape `[B, T]`, already shifted); `mask` is the loss
mask (completion mask, times the tool mask in multi-turn runs).

Advantages are computed on the rewards of the whole batch, gathered across processes (groups of `num_generations`
consecutive completions share a prompt); the trainer slices its own rows afterwards. NaN rewards mean "not
applicable": a reward function returning None for a completion.

Metrics for several processes: the `*_mean` entries of `clip_metrics` and `masked_sum_count` are `[sum, count]` pairs
to sum across processes (`accelerator.reduce(x, "sum")`); the `*_min` / `*_max` entries are per-sequence values to
concatenate (`accelerator.gather`). `reduce_metrics` turns either into TRL's logged floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels import kl_penalty
from .common import Gather, _identity

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_STD_EPS = 1e-4


def nanstd(tensor: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) ignoring NaNs; NaN where fewer than two values are left."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(tensor)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = (variance * correction).sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def nanmin(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum of a 1-D tensor ignoring NaNs; NaN if every value is NaN."""
    kept = tensor[~torch.isnan(tensor)]
    return kept.min() if kept.numel() else tensor.new_tensor(float("nan"))


def nanmax(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of a 1-D tensor ignoring NaNs; NaN if every value is NaN."""
    kept = tensor[~torch.isnan(tensor)]
    return kept.max() if kept.numel() else tensor.new_tensor(float("nan"))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _weighted_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k·r_k ignoring NaN terms; NaN where every function returned NaN (the completion is unscorable)."""
    if rewards_per_func.dim() != 2 or reward_weights.shape != rewards_per_func.shape[1:]:
        raise ValueError(
            "expected rewards_per_func (num_completions, num_reward_funcs) and reward_weights (num_reward_funcs,), "
            f"got {tuple(rewards_per_func.shape)} and {tuple(reward_weights.shape)}"
        )
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def _check_groups(num_completions: int, num_generations: int) -> None:
    if num_generations < 1 or num_completions % num_generations:
        raise ValueError(
            f"the {num_completions} completions must form whole groups of num_generations={num_generations} "
            "(consecutive completions of one prompt); gather the rewards of every process before computing advantages"
        )


def group_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO advantages of the whole (all-process) batch, as `GRPOTrainer._generate_and_score_completions`.

    - `sum_then_normalize`: R = Σ_k w_k·r_k, then A = R − mean_group(R), divided by (std + 1e-4) of the group
      (`scale_rewards="group"`) or of the batch (`"batch"`), or not divided (`"none"`).
    - `normalize_then_sum` (GDPO): each function's rewards are normalized within the group first, then
      A = (R' − mean(R')) / (std(R') + 1e-4) over the batch, whatever `scale_rewards` says (as TRL).

    NaN rewards are left out of every mean and std; completions that no function scored get A = 0.

    Args:
        rewards_per_func: `(N, K)` rewards of N completions (groups of `num_generations` consecutive rows) by K
            functions, NaN where a function does not apply.
        reward_weights: `(K,)`.
        num_generations: completions per prompt.
        scale_rewards: `"group"`, `"batch"` or `"none"`.
        aggregation: `"sum_then_normalize"` or `"normalize_then_sum"`.

    Returns:
        `(advantages, rewards, is_std_zero)`, each `(N,)`: the advantages with NaN set to 0; Σ_k w_k·r_k with NaN
        where every function was NaN (TRL's logged `reward`); whether the std the advantages use (the group's, or the
        batch's) is 0 (TRL's `frac_reward_zero_std` is its mean).
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    _check_choice("multi_objective_aggregation", aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
    num_completions, num_funcs = rewards_per_func.shape[0], rewards_per_func.shape[-1]
    _check_groups(num_completions, num_generations)
    rewards = _weighted_rewards(rewards_per_func, reward_weights)
    unscorable = torch.isnan(rewards)

    if aggregation == "sum_then_normalize":
        grouped = rewards.view(-1, num_generations)
        baseline = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if num_completions > 1 else torch.zeros_like(rewards)
        elif num_generations > 1:
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
        advantages = rewards - baseline
        if scale_rewards != "none":
            advantages = advantages / (std + _STD_EPS)
    else:
        grouped = rewards_per_func.view(-1, num_generations, num_funcs)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        normalized = ((grouped - mean_k) / (std_k + _STD_EPS)).view(-1, num_funcs)
        summed = (
            (normalized * reward_weights.to(normalized.device)).nansum(dim=1).masked_fill(unscorable, float("nan"))
        )
        std = nanstd(summed).expand_as(summed) if num_completions > 1 else torch.zeros_like(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + _STD_EPS)

    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), rewards, is_std_zero


def rloo_sequence_kl(
    old_per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Σ_t (logπ_old − logπ_ref)·m per sequence, `(B,)`: RLOO's first-order (k1) KL, which can be negative.

    Local rows only: gather it across processes like the rewards before `rloo_rewards`. TRL logs `kl` as the sum of
    these over the token count, `Σ kl / Σ m` (reduced across processes).
    """
    return (kl_penalty(old_per_token_logps, ref_per_token_logps, "k1") * mask).sum(-1)


def rloo_rewards(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    *,
    reward_clip_range: tuple[float, float] | None = None,
    beta: float = 0.0,
    sequence_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOO's rewards with the KL penalty in them: clamp(Σ_k w_k·r_k, *reward_clip_range) − β·kl.

    Args:
        rewards_per_func: `(N, K)`, NaN where a function does not apply; rows no function scored stay NaN.
        reward_weights: `(K,)`.
        reward_clip_range: `(low, high)` bounds for the summed reward, or None.
        beta: KL coefficient (RLOOConfig defaults to 0.05); 0 leaves the KL out.
        sequence_kl: `(N,)` from `rloo_sequence_kl`, gathered like the rewards; required when `beta != 0`.
    """
    rewards = _weighted_rewards(rewards_per_func, reward_weights)
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0.0:
        if sequence_kl is None:
            raise ValueError("beta != 0 needs sequence_kl: pass rloo_sequence_kl(old_logps, ref_logps, mask)")
        if sequence_kl.shape != rewards.shape:
            raise ValueError(
                f"sequence_kl must be shaped like the rewards {tuple(rewards.shape)}, got "
                f"{tuple(sequence_kl.shape)}; gather it across processes first"
            )
        rewards = rewards - beta * sequence_kl
    return rewards


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """Leave-one-out advantages A_i = R_i − mean_{j≠i} R_j within each group of `num_generations`, as TRL's RLOO.

    NaN rewards are left out of the baselines (the divisor is the group's scorable count − 1); with `normalize`, the
    advantages are standardized, (A − mean) / (std + 1e-4), over the scorable rows of the batch. NaN advantages
    (unscorable rows, groups with one scorable completion) become 0, and every advantage is 0 when
    `num_generations == 1`.
    """
    _check_groups(rewards.numel(), num_generations)
    if num_generations > 1:
        grouped = rewards.view(-1, num_generations)
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
        advantages = rewards - baselines.view(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + _STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per group of `num_generations`, whether its rewards' std (NaN ignored) is 0: RLOO's `frac_reward_zero_std`
    is the mean of this over the rewards `rloo_advantages` gets."""
    _check_groups(rewards.numel(), num_generations)
    grouped = rewards.view(-1, num_generations)
    std = nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros_like(grouped[:, 0])
    return torch.isclose(std, torch.zeros_like(std))


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's clipped sequence-level loss mean_i −min(r_i·A_i, clamp(r_i, 1−ε_lo, 1+ε_hi)·A_i).

    Args:
        logps: `(B,)` Σ_t logπ·m of each completion under the policy.
        old_logps: `(B,)` the same under the policy that sampled it.
        advantages: `(B,)`.

    Returns:
        `(loss, coef_1)`: the scalar loss, unscaled (the HF Trainer divides it for gradient accumulation, as TRL's
        RLOO lets it), and r, `(B,)`, for `clip_metrics`.
    """
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = coef_1.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return loss.mean(), coef_1


def vllm_importance_sampling_ratio(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """Correction for the gap between the sampler (vLLM) and the trained policy, as GRPO computes it.

    ρ = exp(logπ_old − logπ_sampler) per token (`token_*`, `(B, T)`) or per sequence over the masked tokens
    (`sequence_*`, `(B, 1)`); tokens the sampler could not score (NaN) count as ρ = 1. `*_truncate` clamps ρ to
    [clip_min, clip_max]; `*_mask` sets ρ outside it to 0. Defaults are GRPOConfig's.
    """
    _check_choice("vllm_importance_sampling_mode", mode, VLLM_IMPORTANCE_SAMPLING_MODES)
    log_ratio = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError(f"mode {mode!r} needs clip_min or clip_max (or both) to truncate to")
        return ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def high_entropy_mask(
    entropies: torch.Tensor, mask: torch.Tensor, quantile_threshold: float, gather: Gather | None = None
) -> torch.Tensor:
    """Tokens whose entropy is at least the `quantile_threshold` quantile of the masked entropies, `(B, T)` bool.

    GRPO's `top_entropy_quantile=ρ` keeps the top ρ, i.e. `quantile_threshold = 1 − ρ`. The quantile is taken in fp32
    over the masked entropies of every process: `gather` receives this process's 1-D fp32 tensor of them and returns
    the concatenation (the lengths differ across processes, so pad, gather and drop the padding, as TRL does with a
    negative sentinel). The identity (default) is right for one process. Padding is never selected.
    """
    if not 0.0 <= quantile_threshold <= 1.0:
        raise ValueError(f"quantile_threshold must be in [0, 1], got {quantile_threshold}")
    kept = (gather or _identity)(entropies[mask.bool()].float())
    if kept.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(kept, quantile_threshold)
    return (entropies * mask.float() >= threshold) & mask.bool()


def off_policy_mask(
    advantages: torch.Tensor,
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Off-policy sequence mask (DeepSeek-V3.2), `(B, 1)` in the mask's dtype: 1 keeps a sequence, 0 drops it.

    A sequence is dropped when its advantage is negative and its mean token KL(π_sampler‖π), estimated as
    logπ_sampler − logπ over the masked tokens (NaN sampler log-probs count as 0), exceeds `threshold`.
    `advantages` is `(B, 1)`.
    """
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_gamma_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None = None,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """VESPO's gamma weights φ(w) = exp(λ + k·log w − λ·w), `(B, 1)`, detached (a gradient scale, φ(1) = 1).

    w is the sequence importance weight: exp Σ_t log(π/π_old)·m, with log ρ of the vLLM correction added when
    `importance_sampling_ratio` is given (token log-ratios clamped to ±20, log ρ and log w to [log 1e-8, 20]).
    (k, λ) are the `_pos` values where A ≥ 0, the `_neg` ones elsewhere (λ at least 1e-4); non-finite φ become 0.
    """
    log_floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + torch.log(importance_sampling_ratio).clamp(log_floor, 20.0).sum(dim=-1, keepdim=True)
    log_w = log_w.clamp(log_floor, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    """Scalar ready for `backward`, already divided for gradient accumulation as TRL's `_compute_loss` returns it."""
    policy_loss: torch.Tensor
    """The loss before that division, detached (TRL's `policy_loss` metric)."""
    per_token_kl: torch.Tensor | None
    """k3 KL to the reference, times r with `use_bias_correction_kl`, `(B, T)`; None when `beta == 0`."""
    coef_1: torch.Tensor
    """r as TRL's metrics see it (capped at `delta` when set), `(B, T)` or `(B, 1)`."""
    phi_seq: torch.Tensor | None
    """VESPO's gamma weights `(B, 1)`; None for the other loss types."""


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_per_token_logps: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    importance_sampling_ratio: torch.Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    accumulation_steps: float = 1.0,
    token_normalizer: torch.Tensor | float | None = None,
) -> PolicyLossOutput:
    """GRPO's policy loss and its variants, as `GRPOTrainer._compute_loss` (before the entropy bonus).

    Per token: `grpo`/`bnpo`/`dr_grpo`/`dapo`/`luspo` −min(r·A, clamp(r, 1−ε_lo, 1+ε_hi)·A), with r capped at `delta`
    first when set (two-sided clipping); `cispo` −sg(min(r, ε_hi))·A·logπ; `sapo` −σ(τ(r−1))·4/τ·A with τ by the sign
    of A; `vespo` −φ(w)·A·logπ. Then, in order: × the off-policy mask, × `entropy_mask`, × ρ (the vLLM correction,
    except for `vespo`, which folds ρ into w), + β·KL. Aggregation: `grpo`/`sapo` mean over sequences of the token
    mean; `bnpo` token mean of the batch; `dr_grpo` Σ/(B·max_completion_length); `luspo` mean over sequences of the
    token sum; those are then divided by `accumulation_steps`. `dapo`/`cispo`/`vespo` divide Σ by `token_normalizer`.

    Args:
        per_token_logps: `(B, T)` policy log-probs, with gradient.
        old_per_token_logps: `(B, T)` log-probs of the policy that sampled; None means on-policy (`per_token_logps`
            detached).
        advantages: `(B,)` or `(B, T)`.
        mask: `(B, T)` loss mask.
        loss_type: one of `GRPO_LOSS_TYPES`.
        epsilon_low, epsilon_high: clipping range (GRPOConfig's `epsilon`, and `epsilon_high` or else `epsilon`);
            `cispo` clips r at `epsilon_high` itself.
        delta: upper cap on r for the clipped losses, or None.
        importance_sampling_level: `"token"` or `"sequence"` (GSPO).
        beta: KL coefficient; `ref_per_token_logps` `(B, T)` is then required.
        use_bias_correction_kl: multiply the KL by r (DeepSeek-V3.2).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's τ for A > 0 and A ≤ 0.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: see `vespo_gamma_weights`.
        importance_sampling_ratio: ρ from `vllm_importance_sampling_ratio` (`(B, T)` or `(B, 1)`) when the vLLM
            correction is on, else None.
        off_policy_mask_threshold: enables `off_policy_mask` with this threshold.
        sampling_per_token_logps: `(B, T)` sampler (vLLM) log-probs for the off-policy mask; None uses the old ones.
        entropy_mask: `(B, T)` from `high_entropy_mask`, or None.
        max_completion_length: `dr_grpo`'s constant.
        accumulation_steps: micro-batches per optimizer step (TRL's `current_gradient_accumulation_steps` in
            training, 1 in evaluation).
        token_normalizer: the token count `dapo`/`cispo`/`vespo` divide by; TRL's is
            `num_items_in_batch.clamp(min=1) / num_processes`, times `accumulation_steps / steps_per_generation` in
            training. None uses this batch's token count times `accumulation_steps` (right for one process whose
            micro-batches hold the same number of tokens).
    """
    _check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if per_token_logps.dim() != 2 or mask.shape != per_token_logps.shape:
        raise ValueError(
            f"per_token_logps and mask must both be (B, T), got {tuple(per_token_logps.shape)} and {tuple(mask.shape)}"
        )
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps (the reference model's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length, the constant it normalizes by")

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()

    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weights = log_ratio
    coef_1 = torch.exp(log_weights)

    per_token_kl = None
    if beta != 0.0:
        per_token_kl = kl_penalty(per_token_logps, ref_per_token_logps, "k3")
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    phi_seq = None
    if loss_type == "cispo":
        per_token_loss = -coef_1.clamp(max=epsilon_high).detach() * advantages * per_token_logps
    elif loss_type in _CLIPPED_LOSS_TYPES:
        coef_2 = coef_1.clamp(1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = coef_1.clamp(max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:  # vespo
        phi_seq = vespo_gamma_weights(
            advantages,
            log_ratio,
            mask,
            importance_sampling_ratio,
            vespo_k_pos,
            vespo_lambda_pos,
            vespo_k_neg,
            vespo_lambda_neg,
        )
        per_token_loss = -phi_seq * advantages * per_token_logps

    if off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        per_token_loss = per_token_loss * off_policy_mask(
            advantages, per_token_logps, sampling, mask, off_policy_mask_threshold
        )
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask
    if loss_type in ("dapo", "cispo", "vespo"):
        if token_normalizer is None:
            token_normalizer = mask.sum().clamp(min=1.0) * accumulation_steps
        loss = masked.sum() / token_normalizer
        return PolicyLossOutput(loss, loss.detach(), per_token_kl, coef_1, phi_seq)
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # luspo
        loss = masked.sum(-1).mean()
    return PolicyLossOutput(loss / accumulation_steps, loss.detach(), per_token_kl, coef_1, phi_seq)


class LossScale(NamedTuple):
    accumulation_steps: float
    """What a per-batch mean loss is divided by (1 in evaluation)."""
    token_normalizer: torch.Tensor | None
    """What a token-sum loss is divided by; None without a token count."""


def loss_scale(
    num_items_in_batch: torch.Tensor | None,
    num_processes: int,
    accumulation_steps: int,
    steps_per_generation: int,
    training: bool,
) -> LossScale:
    """The one rule for gradient accumulation and token normalisation of the on-policy losses (GRPO, RLOO's aux
    loss, distillation).

    `Trainer` sums the gradients of the `accumulation_steps` micro-batch losses of an optimizer step, and DDP averages
    them over the `num_processes` processes. A per-batch mean is therefore divided by `accumulation_steps`. A
    token-sum loss should give Σ(step's tokens) / (step's token count): a generation batch of `num_items_in_batch`
    loss tokens (over every process) spans `steps_per_generation` micro-steps, so an optimizer step sees
    `num_items_in_batch · accumulation_steps / steps_per_generation` of them; a process's micro-batch loss is its
    local sum divided by that count times `num_processes` (undoing DDP's average), i.e. by
    `num_items_in_batch / num_processes · accumulation_steps / steps_per_generation`. In evaluation nothing is
    accumulated: the batch is a whole generation batch, divided by `num_items_in_batch / num_processes`.
    """
    accumulation = accumulation_steps if training else 1.0
    if num_items_in_batch is None:
        return LossScale(accumulation, None)
    normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
    if training:
        normalizer = normalizer * accumulation / steps_per_generation
    return LossScale(accumulation, normalizer)


def entropy_bonus(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    entropy_mask: torch.Tensor | None = None,
    accumulation_steps: float = 1.0,
) -> torch.Tensor:
    """Mean entropy over the tokens the policy loss acts on (`mask`, times `entropy_mask` when given), divided by
    `accumulation_steps`: GRPO's entropy bonus, `loss − entropy_coef · entropy_bonus(...)`."""
    effective = mask if entropy_mask is None else mask * entropy_mask
    return (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation_steps


def masked_sum_count(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`[Σ x·m, Σ m]` for token values `(B, T)`, or `[Σ x, B]` for one value per sequence (`(B,)` or `(B, 1)`,
    `mask` unused): sum it across processes, then mean = sum / max(count, 1) (`reduce_metrics`).

    TRL's `kl`, `entropy` and `vespo/phi_seq_mean` metrics are this, reduced."""
    if values.dim() == 1 or values.shape[-1] == 1:
        return torch.stack([values.sum(), values.new_tensor(float(values.shape[0]))])
    return torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])


def _per_sequence(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked token mean per sequence (NaN for empty rows), or the values themselves if already one per sequence."""
    if values.dim() == 1 or values.shape[-1] == 1:
        return values.reshape(-1)
    return (values * mask).sum(-1) / mask.sum(-1)


def clip_metrics(
    coef_1: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
) -> dict[str, torch.Tensor]:
    """The local pieces of TRL's clipping metrics, keyed by TRL's metric names.

    For the clipped losses (and RLOO: pass its `(B,)` ratios and advantages with `mask=None`): a token is low-clipped
    when r < 1 − ε_lo and A < 0, high-clipped when r > 1 + ε_hi and A > 0; `clip_ratio/{low,high,region}_mean` are
    `[sum, count]` pairs (`masked_sum_count`) and `clip_ratio/low_min` / `clip_ratio/high_max` the per-sequence
    clipped fractions `(B,)` (NaN for empty rows). For `cispo`: `cispo_clip_ratio`, the `[sum, count]` of
    r > ε_hi and A > 0. Nothing for `sapo` and `vespo`. Reduce with `reduce_metrics`.

    Args:
        coef_1: r, `(B, T)`, `(B, 1)` or `(B,)` (`PolicyLossOutput.coef_1`).
        advantages: `(B,)`, `(B, 1)` or `(B, T)`, broadcastable against `coef_1` once `(B,)` is made `(B, 1)`.
        mask: `(B, T)` loss mask for token-level ratios; unused for one ratio per sequence.
    """
    _check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    coef_1 = coef_1.detach()
    if coef_1.dim() == 2 and advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if loss_type == "cispo":
        return {"cispo_clip_ratio": masked_sum_count(((coef_1 > epsilon_high) & (advantages > 0)).float(), mask)}
    if loss_type not in _CLIPPED_LOSS_TYPES:
        return {}
    low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    return {
        "clip_ratio/low_mean": masked_sum_count(low.float(), mask),
        "clip_ratio/low_min": _per_sequence(low.float(), mask),
        "clip_ratio/high_mean": masked_sum_count(high.float(), mask),
        "clip_ratio/high_max": _per_sequence(high.float(), mask),
        "clip_ratio/region_mean": masked_sum_count((low | high).float(), mask),
    }


def reduce_metrics(
    local: dict[str, torch.Tensor],
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gather: Gather | None = None,
) -> dict[str, float]:
    """Floats to log from `clip_metrics` / `masked_sum_count` pieces: names ending in `_min` / `_max` take the NaN-
    ignoring min / max of `gather(values)`; the others are `[sum, count]` pairs, `sum / max(count, 1)` after
    `reduce_sum` (`lambda t: accelerator.reduce(t, "sum")`). Both default to the identity (one process)."""
    reduce_sum, gather = reduce_sum or _identity, gather or _identity
    out = {}
    for name, value in local.items():
        if name.endswith("_min"):
            out[name] = nanmin(gather(value)).item()
        elif name.endswith("_max"):
            out[name] = nanmax(gather(value)).item()
        else:
            totals = reduce_sum(value)
            out[name] = (totals[0] / totals[1].clamp(min=1.0)).item()
    return out

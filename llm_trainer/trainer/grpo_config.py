"""Configuration for `GRPOTrainer`: the fields and defaults of TRL 1.16's `GRPOConfig`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..losses.policy_gradient import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    VLLM_IMPORTANCE_SAMPLING_MODES,
)
from .base_config import check_choices, option
from .online_config import OnlineRLConfig

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(OnlineRLConfig):
    """Configuration for [`GRPOTrainer`]: GRPO and its variants (DAPO, Dr. GRPO, BNPO, GSPO, CISPO, SAPO, LUSPO, VESPO).

    Field names and defaults are TRL 1.16's (`learning_rate=1e-6`, `num_generations=8`, `beta=0.0`,
    `loss_type="dapo"`, `scale_rewards="group"`, ...). `scale_rewards=True`/`False` is stored as "group"/"none";
    `epsilon_high=None` stays None and means `epsilon`. Values outside a field's choices raise here rather than at the
    first training step.
    """

    _algorithm = "GRPO"
    _inert_fields = {
        "log_completions_hub_repo": "logged completions are not pushed to the Hub here; they go to the `report_to` "
        "integrations."
    }

    cast_lm_head_to_fp32: bool = option(
        False, "Compute the policy's and reference's lm_head in float32 (ScaleRL); needs untied word embeddings."
    )

    # Loss
    delta: float | None = option(
        None, "Upper clip of the ratio for two-sided GRPO (INTELLECT-2), ideally > 1 + ε; None disables."
    )
    sapo_temperature_neg: float = option(1.05, "SAPO gate temperature for tokens with a non-positive advantage.")
    sapo_temperature_pos: float = option(1.0, "SAPO gate temperature for tokens with a positive advantage.")
    vespo_k_pos: float = option(2.0, "VESPO power k for positive advantages (down-weights ratios below 1).")
    vespo_lambda_pos: float = option(3.0, "VESPO decay λ for positive advantages (down-weights ratios above 1).")
    vespo_k_neg: float = option(3.0, "VESPO power k for negative advantages (down-weights ratios below 1).")
    vespo_lambda_neg: float = option(2.0, "VESPO decay λ for negative advantages (down-weights ratios above 1).")
    importance_sampling_level: str = option(
        "token",
        "'token': one importance ratio per token; 'sequence': the length-averaged log-ratio per sequence (GSPO).",
        choices=list(IMPORTANCE_SAMPLING_LEVELS),
    )
    multi_objective_aggregation: str = option(
        "sum_then_normalize",
        "With several reward functions: 'sum_then_normalize' weighs and sums them, then scales per `scale_rewards`; "
        "'normalize_then_sum' normalizes each within its group first (GDPO).",
        choices=list(MULTI_OBJECTIVE_AGGREGATIONS),
    )
    scale_rewards: str = option(
        "group",
        "Divide advantages by the reward std of each 'group' (True), of the whole 'batch', or 'none' (False; Dr. GRPO).",
    )
    loss_type: str = option(
        "dapo",
        "Loss and token normalization: 'grpo' (per sequence), 'dr_grpo' (constant), 'dapo' (tokens in the accumulated "
        "batch), 'bnpo' (tokens in the local batch), 'cispo', 'sapo', 'luspo' or 'vespo'.",
        choices=list(GRPO_LOSS_TYPES),
    )
    top_entropy_quantile: float = option(
        1.0,
        "Train only on this top fraction of tokens by entropy, in [0, 1]; 1.0 keeps all, 0.2 is the paper's choice.",
    )
    entropy_coef: float = option(
        0.0, "Weight of the mean per-token entropy bonus; 0 disables it. Initial value with adaptive entropy."
    )
    use_adaptive_entropy: bool = option(
        False, "Raise or lower `entropy_coef` each step to keep entropy near `entropy_target` (Skywork-OR1)."
    )
    entropy_coef_min: float = option(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = option(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = option(0.005, "Per-step change of the adaptive entropy coefficient.")
    entropy_target: float = option(
        0.2,
        "Mean per-token entropy (nats) below which the adaptive bonus applies; set it near the entropy seen early in "
        "training.",
    )
    max_tool_calling_iterations: int | None = option(
        None, "Most tool-calling turns per rollout when training an agent; None means no limit."
    )
    off_policy_mask_threshold: float | None = option(
        None,
        "Mask sequences with a negative advantage whose KL to the sampling policy exceeds this (DeepSeek-V3.2, e.g. "
        "0.5); None disables.",
    )
    use_bias_correction_kl: bool = option(
        True, "Weight the KL term by the importance ratio for an unbiased reverse-KL gradient."
    )

    # vLLM importance-sampling correction
    vllm_importance_sampling_correction: bool = option(
        True, "Correct the mismatch between vLLM's and the trainer's log-probs with importance sampling."
    )
    vllm_importance_sampling_mode: str = option(
        "sequence_mask",
        "Per-token or per-sequence ratios, clipped into [clip_min, clip_max] ('*_truncate') or zeroed outside it "
        "('*_mask').",
        choices=list(VLLM_IMPORTANCE_SAMPLING_MODES),
    )
    vllm_importance_sampling_clip_max: float | None = option(
        3.0, "Upper bound of the vLLM importance ratio; None means unbounded."
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, "Lower bound of the vLLM importance ratio; None means unbounded."
    )

    # Logging
    log_completions_hub_repo: str | None = option(
        None, "Hub dataset repository to push logged completions to; needs `log_completions=True`."
    )

    # Deprecated
    vllm_importance_sampling_cap: float | None = option(None, "Deprecated; use `vllm_importance_sampling_clip_max`.")

    def __post_init__(self):
        self.scale_rewards = _parse_scale_rewards(self.scale_rewards)
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        check_choices(
            self,
            "loss_type",
            "importance_sampling_level",
            "multi_objective_aggregation",
            "vllm_importance_sampling_mode",
        )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError(
                "`log_completions_hub_repo` is set, but log_completions is False, so nothing would be uploaded. Set "
                "`log_completions=True` or unset `log_completions_hub_repo`."
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"`top_entropy_quantile` must lie in [0, 1], got {self.top_entropy_quantile}.")
        clip_min, clip_max = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if clip_min is not None and clip_max is not None and clip_min >= clip_max:
            raise ValueError(
                f"`vllm_importance_sampling_clip_min` ({clip_min}) must be less than "
                f"`vllm_importance_sampling_clip_max` ({clip_max})."
            )
        truncating = self.vllm_importance_sampling_mode.endswith("_truncate")
        if self.vllm_importance_sampling_correction and truncating and clip_min is None and clip_max is None:
            raise ValueError(
                f"`vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}` clips the ratio, so set "
                "`vllm_importance_sampling_clip_min` or `vllm_importance_sampling_clip_max` (or both)."
            )
        if (
            self.loss_type == "vespo"
            and self.use_vllm
            and self.vllm_importance_sampling_correction
            and not self.vllm_importance_sampling_mode.startswith("token_")
        ):
            raise ValueError(
                "The 'vespo' loss weighs sequences itself, so the vLLM correction must be per token: set "
                "`vllm_importance_sampling_mode` to 'token_truncate' or 'token_mask', got "
                f"{self.vllm_importance_sampling_mode!r}."
            )
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            logger.warning("The 'luspo' loss is defined with `importance_sampling_level='sequence'`; consider it.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            logger.warning(
                "The 'vespo' loss builds its own sequence-level weights; keep `importance_sampling_level='token'`."
            )
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning(
                "With `importance_sampling_level='sequence'`, the %r loss sums per-token terms, which weights each "
                "sequence by its completion length; use `loss_type='grpo'` for GSPO's per-sequence objective.",
                self.loss_type,
            )


def _parse_scale_rewards(value: str | bool) -> str:
    """TRL's boolean spellings: True (or "true" from the CLI) is "group", False is "none"."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return {True: "group", False: "none"}.get(value, value)

"""Pieces shared by the preference losses: sequence reductions, loss shapes and paired metrics.

Conventions for every module in `llm_trainer.losses`:

- `per_token_logps` are next-token log-probabilities already shifted against their labels, **zero where the mask is
  zero** (as the fused LM head returns them), shape `[batch, seq]`; `mask` is the matching completion mask.
- Sequence log-probs (`*_logps`) are shape `[batch]`.
- Metric helpers take `gather`, a callable that concatenates a tensor across processes (`accelerator.gather` or
  `accelerator.gather_for_metrics`); the default is the identity, which is right for a single process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Σ_t logp_t·m_t per row, or that sum divided by Σ_t m_t when `average` (TRL's `get_batch_logps`)."""
    summed = (per_token_logps * mask).sum(-1)
    return summed / mask.sum(-1) if average else summed


def masked_mean_nll(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−mean of logp over the masked tokens of the whole batch: the token-level NLL (cross-entropy) that DPO's `sft`
    term, CPO's `nll_loss` and ORPO's `nll_loss` use."""
    return -per_token_logps[mask.bool()].mean()


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Conservative (label-smoothed) logistic loss −(1−ε)·logσ(x) − ε·logσ(−x), per element."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def hinge_loss(logits: torch.Tensor) -> torch.Tensor:
    """SLiC hinge loss relu(1 − x), per element."""
    return torch.relu(1 - logits)


def ipo_loss(logratio_delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO squared loss (Δ − 1/(2β))², per element; β plays the role of the paper's τ."""
    return (logratio_delta - 1 / (2 * beta)) ** 2


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    gather: Gather | None = None,
) -> dict[str, float]:
    """The paired metrics DPO, CPO and ORPO log, each the mean over the gathered batch.

    `rewards/{chosen,rejected}`, `rewards/accuracies` = mean(r_c > r_r), `rewards/margins` = mean(r_c − r_r),
    `logps/{chosen,rejected}`.
    """
    gather = gather or _identity
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": gather(chosen_rewards).mean().item(),
        "rewards/rejected": gather(rejected_rewards).mean().item(),
        "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean().item(),
        "rewards/margins": gather(chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": gather(chosen_logps.detach()).mean().item(),
        "logps/rejected": gather(rejected_logps.detach()).mean().item(),
    }

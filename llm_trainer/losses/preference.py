"""DPO-family losses on paired (chosen, rejected) sequence log-probs, as TRL 1.16's `DPOTrainer._compute_loss`.

Notation: c = logπ(y_c) − logπ_ref(y_c) and r = logπ(y_r) − logπ_ref(y_r) are the log-ratios; s_c = f'(c), s_r = f'(r)
the scores after the f-divergence transform (identity for reverse KL); Δ = s_c − s_r. Every loss type yields one
value per pair; several types combine as Σ_k w_k·mean(loss_k).

The batch layout the helpers expect is TRL's collator's: 2B rows, the B chosen rows first, then the B rejected rows.

`bco_pair` has no running reward shift in TRL 1.x (TRL 0.x subtracted one); the running mean lives with BCO in
`llm_trainer.losses.unpaired`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import hinge_loss, ipo_loss, sequence_logps, smoothed_sigmoid_loss

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterization leaves a β·log Z(x) term that only cancels in the chosen − rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_LENGTH_NORMALIZED = ("ipo", "sigmoid_norm")
_SORTING = ("aot", "aot_unpaired")


class DPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar Σ_k w_k·mean(loss_k)."""
    chosen_rewards: torch.Tensor
    """β·c, detached, shape [B]."""
    rejected_rewards: torch.Tensor
    """β·r, detached, shape [B]."""


def f_divergence_scores(
    logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> torch.Tensor:
    """f'(t) at t = π/π_ref, from u = log t (f-DPO).

    reverse_kl: u; forward_kl: 1 − e^(−u); js_divergence: log 2 + logσ(u);
    alpha_divergence: (e^((α−1)u) − 1)/(α−1), computed in ≥float32 with the exponent clamped at 80 (11 for
    float16) so it stays finite, and equal to u when |α − 1| < 1e-6.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        dtype = logratios.dtype
        exponent = ((alpha - 1.0) * logratios).to(torch.promote_types(dtype, torch.float32))
        exponent = exponent.clamp(max=11.0 if dtype == torch.float16 else 80.0)
        return (torch.exp(exponent) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}. Valid types: {', '.join(F_DIVERGENCE_TYPES)}.")


def check_dpo_options(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    f_divergence_type: str = "reverse_kl",
    label_smoothing: float = 0.0,
    use_weighting: bool = False,
) -> list[str]:
    """Validate a DPO configuration the way TRL's `DPOConfig`/`DPOTrainer` do; return the loss types as a list."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in loss_types if name not in DPO_LOSS_TYPES]
    if unknown or not loss_types:
        raise ValueError(
            f"Unknown DPO loss_type {unknown or loss_types}. Valid loss types: {', '.join(DPO_LOSS_TYPES)}."
        )
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(
            f"`loss_weights` must have the same length as `loss_type`: it has {len(loss_weights)} entries for "
            f"{len(loss_types)} loss types ({loss_types}). "
            "Pass one weight per loss type, or `loss_weights=None` to weight every loss type 1.0."
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"Unknown f_divergence_type {f_divergence_type!r}. Valid types: {', '.join(F_DIVERGENCE_TYPES)}."
        )
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= set(F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"`f_divergence_type={f_divergence_type!r}` is only supported for the loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; you passed {loss_types}. Use `f_divergence_type='reverse_kl'` "
            "with these losses."
        )
    if use_weighting and set(loss_types) & set(_SORTING):
        raise NotImplementedError(
            "WPO weighting (`use_weighting=True`) is not implemented for 'aot' or 'aot_unpaired': those losses sort "
            "the batch, which would misalign the per-pair weights."
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("The 'exo_pair' loss needs `label_smoothing` > 0 (its ε; the EXO paper recommends 1e-3).")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        warnings.warn(
            f"`label_smoothing` should lie in [0.0, 0.5) for the 'robust' loss; got {label_smoothing}.", stacklevel=2
        )
    return loss_types


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> DPOLossOutput:
    """DPO-family loss over a batch of B pairs of sequence log-probs (shape [B] each).

    Per pair, with Δ = s_c − s_r (see the module docstring) and ε = `label_smoothing`:

    - sigmoid: −logσ(βΔ)                          - hinge: relu(1 − βΔ)
    - ipo: (s_c/|y_c| − s_r/|y_r| − 1/(2β))²        - sigmoid_norm: −logσ(β(s_c/|y_c| − s_r/|y_r|))
    - exo_pair: σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)
    - nca_pair: −logσ(βc) − ½logσ(−βc) − ½logσ(−βr)
    - robust: (−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)
    - bco_pair: −logσ(βc) − logσ(−βr)            - sppo_hard: (c − 1/(2β))² + (r + 1/(2β))²
    - aot: −(1−ε)logσ(βd) − ε·logσ(−βd), d = sort(logπ_c − logπ_r) − sort(logπ_ref,c − logπ_ref,r)
    - aot_unpaired: the same with d = sort(c) − sort(r)
    - apo_zero: 1 − σ(βc) + σ(βr)                   - apo_down: σ(βc) + 1 − σ(β(c − r))
    - discopop: (1 − m)(−logσ(βΔ)) + m·e^(−βΔ), m = σ(βΔ/τ)
    - sft: `chosen_nll`, the token-mean NLL of the chosen completions (see `masked_mean_nll`)

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: sequence log-probs summed over the
            completion tokens (use `dpo_sequence_logps` for LD-DPO).
        beta: β. For `ipo` it is the paper's τ.
        loss_type: one type or a list; a list combines as Σ_k w_k·mean(loss_k).
        loss_weights: w_k, one per loss type; None means 1.0 each.
        label_smoothing: ε for `robust`, `exo_pair`, `aot` and `aot_unpaired` (TRL's `sigmoid` ignores it).
        f_divergence_type, f_alpha_divergence_coef: the transform f' (see `f_divergence_scores`); only the types in
            `F_DIVERGENCE_LOSS_TYPES` accept a non-default one.
        discopop_tau: τ of `discopop`.
        chosen_lengths, rejected_lengths: completion token counts (TRL sums the unshifted completion mask), needed by
            `ipo` and `sigmoid_norm`.
        chosen_nll: scalar NLL, needed by `sft`.
        pair_weights: per-pair weights multiplied into every loss type before the mean (WPO; see `wpo_weights`).

    Returns:
        `DPOLossOutput(loss, chosen_rewards=β·c, rejected_rewards=β·r)`, rewards detached.
    """
    loss_types = check_dpo_options(
        loss_type,
        loss_weights,
        f_divergence_type=f_divergence_type,
        label_smoothing=label_smoothing,
        use_weighting=pair_weights is not None,
    )
    if set(loss_types) & set(_LENGTH_NORMALIZED) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("The 'ipo' and 'sigmoid_norm' losses need `chosen_lengths` and `rejected_lengths`.")
    if "sft" in loss_types and chosen_nll is None:
        raise ValueError("The 'sft' loss needs `chosen_nll` (see `llm_trainer.losses.masked_mean_nll`).")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)

    def length_normalized_delta() -> torch.Tensor:
        return chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)

    def sorted_delta(unpaired: bool) -> torch.Tensor:
        if unpaired:
            return chosen_logratios.sort(dim=0).values - rejected_logratios.sort(dim=0).values
        policy = (chosen_logps - rejected_logps).sort(dim=0).values
        return policy - (ref_chosen_logps - ref_rejected_logps).sort(dim=0).values

    def exo_pair() -> torch.Tensor:
        epsilon = torch.tensor(label_smoothing, device=logits.device)
        chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-epsilon))
        return chosen_term + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(epsilon))

    def discopop() -> torch.Tensor:
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation

    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    per_pair: dict[str, Callable[[], torch.Tensor]] = {
        "sigmoid": lambda: -F.logsigmoid(logits),
        "hinge": lambda: hinge_loss(logits),
        "ipo": lambda: ipo_loss(length_normalized_delta(), beta),
        "exo_pair": exo_pair,
        "nca_pair": lambda: (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        ),
        "robust": lambda: (
            (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits))
            / (1 - 2 * label_smoothing)
        ),
        "bco_pair": lambda: -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards),
        "sppo_hard": lambda: (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2,
        "aot": lambda: smoothed_sigmoid_loss(beta * sorted_delta(unpaired=False), label_smoothing),
        "aot_unpaired": lambda: smoothed_sigmoid_loss(beta * sorted_delta(unpaired=True), label_smoothing),
        "apo_zero": lambda: (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards),
        "apo_down": lambda: (
            torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        ),
        "discopop": discopop,
        "sft": lambda: chosen_nll.expand(chosen_logps.size(0)),
        "sigmoid_norm": lambda: -F.logsigmoid(beta * length_normalized_delta()),
    }

    loss = 0.0
    for name, weight in zip(loss_types, weights):
        pair_loss = per_pair[name]()
        if pair_weights is not None:
            pair_loss = pair_loss * pair_weights
        loss = loss + pair_loss.mean() * weight
    return DPOLossOutput(loss, chosen_rewards.detach(), rejected_rewards.detach())


def dpo_sequence_logps(
    per_token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None
) -> torch.Tensor:
    """Sequence log-probs of a [chosen; rejected] batch of 2B rows, optionally length-desensitized (LD-DPO).

    Without `ld_alpha`: Σ_t logp_t·m_t. With it, for each pair the first ℓ = min(|y_c|, |y_r|) completion tokens
    count fully and the rest (the verbose tail of the longer response) is scaled by α:
    Σ_{t≤ℓ} logp_t + α·Σ_{t>ℓ} logp_t. Apply it to the policy and the reference log-probs alike.
    """
    if ld_alpha is None:
        return sequence_logps(per_token_logps, mask)
    position = mask.cumsum(dim=1)  # 1, 2, ... along the completion
    chosen_lengths, rejected_lengths = mask.sum(dim=1).chunk(2, dim=0)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)
    in_completion = mask.bool()
    shared_logps = (per_token_logps * (in_completion & (position <= shared))).sum(dim=1)
    tail_logps = (per_token_logps * (in_completion & (position > shared))).sum(dim=1)
    return shared_logps + ld_alpha * tail_logps


@torch.no_grad()
def wpo_weights(per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO per-pair weights (no gradient) for a [chosen; rejected] batch of 2B rows, shape [B].

    w(y) = exp(mean_t(logp_t − log Σ_v p_v²)) over the completion tokens (length-normalised probability of y under
    the policy, aligned by the sampling distribution), and the pair weight is w(y_c)·w(y_r). `log_sum_sq_probs` is
    log Σ_v p_v² per position (`logsumexp(2z) − 2·logsumexp(z)` for logits z; the fused LM head returns it).
    """
    aligned = ((per_token_logps - log_sum_sq_probs) * mask).sum(dim=1)
    weights = torch.exp(aligned / mask.sum(dim=1).clamp_min(1))
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    return chosen_weights * rejected_weights


def online_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair loss of Online DPO (and of the online preference family) from summed sequence log-probs, shape [B].

    With h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r)): 'sigmoid' is −logσ(βh), 'ipo' is
    (h − 1/(2β))², on summed (not length-normalised) log-probs, unlike `dpo_loss`'s IPO.
    """
    margin = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"Unknown Online DPO loss_type {loss_type!r}: use 'sigmoid' or 'ipo'.")


def rank_pairs(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected row indices of a [first; second] batch of 2B completions, from one score per completion
    (`first[i]` and `second[i]` score the two completions of prompt i; a tie chooses the first)."""
    batch = first.size(0)
    second_wins = (first < second).long()
    rows = torch.arange(batch, device=first.device)
    return rows + second_wins * batch, rows + (1 - second_wins) * batch

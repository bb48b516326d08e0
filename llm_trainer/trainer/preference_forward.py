"""The concatenated forward of paired-preference trainers: one pass over [chosen; rejected] → sequence log-probs.

Used by `DPOTrainer` (policy and reference passes, precomputed reference log-probs) and meant for every trainer fed
by `DataCollatorForPreference` (ORPO, CPO): a batch holds 2B rows, the B chosen sequences first, then the B rejected
ones, with a `completion_mask` marking the completion tokens. The model must be patched by
`modeling.add_token_logprob_head`, so the `(2B, T, vocab)` logits are never built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..losses import dpo_sequence_logps, sequence_logps
from ..modeling import completion_labels

__all__ = ["NON_MODEL_KEYS", "POLICY_OUTPUTS", "PairedLogps", "concatenated_forward", "paired_token_metrics"]

NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
"""Batch keys that are not model inputs (everything else in the batch is passed to the model, as TRL does)."""

POLICY_OUTPUTS = ("entropy", "is_top1", "mean_logits")
"""The per-token fields `paired_token_metrics` reads: pass them as `add_token_logprob_head(model, outputs=...)`."""


class PairedLogps(NamedTuple):
    """One [chosen; rejected] batch through a model."""

    chosen_logps: torch.Tensor
    """Sequence log-probs of the chosen completions, shape [B]."""
    rejected_logps: torch.Tensor
    """Sequence log-probs of the rejected completions, shape [B]."""
    per_token_logps: torch.Tensor
    """Next-token log-probs, shape [2B, T-1], 0 outside the completions."""
    mask: torch.Tensor
    """The completion mask shifted against the labels, shape [2B, T-1]."""
    outputs: Any
    """The model's `TokenLogprobOutput` (entropy, top-1 flags, mean logits, ... per token)."""


def concatenated_forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    ld_alpha: float | None = None,
    average: bool = False,
    **forward_kwargs: Any,
) -> PairedLogps:
    """Run a collated preference batch through `model` once and reduce the completion log-probs per sequence.

    The labels are the input ids with everything but the completion tokens set to -100. Sequence log-probs are the
    sum over the completion tokens, the LD-DPO sum when `ld_alpha` is set (see `losses.dpo_sequence_logps`), or the
    per-token average when `average` (ORPO, SimPO). `forward_kwargs` go to the model (e.g.
    `output_router_logits=True`).
    """
    if average and ld_alpha is not None:
        raise ValueError("`average=True` and `ld_alpha` are exclusive: LD-DPO weights a summed log-prob.")
    completion_mask = batch["completion_mask"]
    model_inputs = {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
    labels = completion_labels(batch["input_ids"], completion_mask, batch.get("attention_mask"))
    outputs = model(**model_inputs, labels=labels, token_logprobs=True, **forward_kwargs)
    mask = completion_mask[:, 1:]
    # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens.
    per_token_logps = outputs.log_probs[:, -mask.size(1) :]
    if average:
        logps = sequence_logps(per_token_logps, mask, average=True)
    else:
        logps = dpo_sequence_logps(per_token_logps, mask, ld_alpha)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    return PairedLogps(chosen_logps, rejected_logps, per_token_logps, mask, outputs)


def paired_token_metrics(
    forward: PairedLogps, sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """The per-token metrics TRL's `DPOTrainer` logs, token-weighted across processes.

    `entropy` (over every completion token), `logits/chosen` and `logits/rejected` (mean logit over the vocabulary,
    averaged over the chosen / rejected completion tokens; needs `mean_logits` from the forward) and
    `mean_token_accuracy` (top-1 accuracy on the chosen completion tokens). A metric over no tokens is 0.0.
    `sum_across_processes` sums a scalar tensor over processes (e.g. `base_trainer.gather_sum`); identity when None.
    """
    total = sum_across_processes or (lambda value: value)
    outputs, mask = forward.outputs, forward.mask
    seq_len = mask.size(1)
    bool_mask = mask.bool()
    chosen_mask, rejected_mask = bool_mask.chunk(2, dim=0)

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
        numerator, denominator = total(numerator.detach().float()), total(denominator.detach().float())
        return (numerator / denominator).item() if denominator.item() > 0 else 0.0

    entropy = outputs.entropy[:, -seq_len:]
    mean_logits = outputs.mean_logits[:, -seq_len:]
    chosen_logits, rejected_logits = mean_logits.chunk(2, dim=0)
    chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
    return {
        "entropy": ratio((entropy * mask).sum(), mask.sum()),
        "logits/chosen": ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()),
        "logits/rejected": ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()),
        "mean_token_accuracy": ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()),
    }

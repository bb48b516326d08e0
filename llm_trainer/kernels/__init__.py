"""Token log-probabilities, entropy and KL without materializing `(tokens, vocab)` fp32 logits.

- `token_logprobs`: the fused LM head. Projects `hidden` through the head in tiles, only at positions whose label
  is kept, and returns per-token log-probs (plus entropy and top-1 flags on request) with gradients for the hidden
  states, the head weight and its bias. The logits are recomputed in the backward instead of being stored.
- `selective_log_softmax`, `entropy_from_logits`: TRL's functions of the same names, on logits you already have,
  without a full-size `log_softmax` kept for the backward.
- `selective_log_softmax_and_entropy`: both at once, from one pass over the logits (TRL's kernel of that name).
- `ChunkedLogProbFunction`: TRL's autograd function for the fused head (`token_logprobs` with TRL's arguments).
- `kl_penalty`: the k1 / k2 / k3 per-token KL estimators.

TRL's kernel modules exist at the same paths: `chunked_logprob`, `logprob_entropy` and `chunked_divergence` (the
distillation divergence from hidden states).

Back ends: Triton kernels when the tensors are on CUDA and `triton` is installed (`pip install "llm-trainer[kernels]"`),
chunked PyTorch otherwise. Force one with `backend="torch" | "triton"` or the `LLM_TRAINER_KERNEL_BACKEND`
environment variable; on CPU, the Triton back end runs only under `TRITON_INTERPRET=1` (for tests).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cache

import torch

from .logprob_torch import (
    Entropy,
    FusedHeadLogprobs,
    FusedHeadOptions,
    LogitTransform,
    RowOps,
    SelectiveLogSoftmax,
    SelectiveLogSoftmaxAndEntropy,
    TorchRowOps,
)

__all__ = [
    "ChunkedLogProbFunction",
    "LMHead",
    "entropy_from_logits",
    "kl_penalty",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "token_logprobs",
]

BACKEND_ENV = "LLM_TRAINER_KERNEL_BACKEND"
KL_ESTIMATORS = ("k1", "k2", "k3")


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _row_ops(device: torch.device, backend: str | None) -> RowOps:
    """The back end for tensors on `device`: `backend`, else `$LLM_TRAINER_KERNEL_BACKEND`, else by device."""
    backend = backend or os.environ.get(BACKEND_ENV)
    if not backend:
        backend = "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if backend == "torch":
        return TorchRowOps
    if backend != "triton":
        raise ValueError(f"backend must be 'torch', 'triton' or None, got {backend!r}")
    if not _triton_installed():
        raise ImportError('The Triton back end needs triton: pip install "llm-trainer[kernels]"')
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton kernels run on CPU tensors only with TRITON_INTERPRET=1, set before triton is imported"
        )
    from .logprob_triton import TritonRowOps

    return TritonRowOps


@dataclass(frozen=True)
class LMHead:
    """An LM head as the kernels take it: `weight (V, H)`, `bias (V,)` or None, and the logit transform
    (`logit_scale`, `softcap`; None when unset) of `token_logprobs`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`log_softmax(logits / temperature)` gathered at `index`, as TRL's function of the same name.

    Equal to `torch.gather(logits.div(temperature).log_softmax(-1), -1, index)` but it keeps no full-size
    `log_softmax` (nor a temperature-scaled copy) for the backward: only one fp32 log-sum-exp per row. On the
    PyTorch back end, bf16/fp16 values are exactly that expression in their own dtype (TRL's non-Triton values, bit
    for bit), taken a bounded chunk of rows at a time; the Triton back end reduces them in fp32 and rounds once.

    Args:
        logits: `(..., V)`, any float dtype.
        index: `(...)` for one log-prob per row, or `(..., K)` for K of them; int64.
        temperature: divides the logits; must be positive.
        row_mask: same shape as `index`; log-probs where it is 0 are set to 0.
        backend: `"torch"`, `"triton"` or None (automatic).

    Returns:
        The log-probs, shaped like `index`, in the dtype of `logits`.
    """
    _check_temperature(temperature)
    squeeze = index.dim() == logits.dim() - 1
    ops = _row_ops(logits.device, backend)
    logps = SelectiveLogSoftmax.apply(logits, index.unsqueeze(-1) if squeeze else index, temperature, ops)
    if squeeze:
        logps = logps.squeeze(-1)
    return logps if row_mask is None else logps.masked_fill(row_mask == 0, 0.0)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_softmax(logits / temperature)` at `index` and the entropy of `softmax(logits / temperature)`, together.

    One pass over each row yields both (TRL's kernel of the same name); gradients flow into `logits` from either.

    Args:
        logits: `(..., V)`, any float dtype.
        index: `(...)` int64, one label per row.
        temperature: divides the logits; must be positive.
        row_mask: `(...)`; rows where it is 0 get 0 for both outputs (and no gradient).
        backend: `"torch"`, `"triton"` or None (automatic).

    Returns:
        `(logprobs, entropy)`, fp32 `(...)`.
    """
    _check_temperature(temperature)
    if index.shape != logits.shape[:-1]:
        raise ValueError(
            f"index must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}"
        )
    ops = _row_ops(logits.device, backend)
    logps, entropy = SelectiveLogSoftmaxAndEntropy.apply(logits, index.unsqueeze(-1), 1.0 / temperature, ops)
    if row_mask is not None:
        skipped = row_mask == 0
        logps, entropy = logps.masked_fill(skipped, 0.0), entropy.masked_fill(skipped, 0.0)
    return logps, entropy


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128, *, backend: str | None = None) -> torch.Tensor:
    """Entropy in nats of `softmax(logits)` along the last axis, as TRL's function of the same name.

    Args:
        logits: `(..., V)`, any float dtype.
        chunk_size: rows reduced at a time by the PyTorch back end (bounds its scratch to a few `chunk_size * V`
            arrays). There, bf16/fp16 values are `-(p * log p).sum(-1)` in their own dtype with `log p` from
            `log_softmax`, as TRL computes them; the backward works in fp32 either way.
        backend: `"torch"`, `"triton"` or None (automatic).

    Returns:
        `(...)` in the dtype of `logits`, differentiable.
    """
    return Entropy.apply(logits, chunk_size, _row_ops(logits.device, backend))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    *,
    return_accuracy: bool = False,
    return_mean_logits: bool = False,
    return_log_sum_sq_probs: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token `log p(label)` under the LM head, without materializing the logits.

    The logits are `z = softcap * tanh(logit_scale * l / softcap) / temperature` with `l = hidden @ weight.T + bias`
    (no `tanh` without `softcap`, Gemma-2 style; `logit_scale` as in Cohere). Only rows whose label is not
    `ignore_index` are projected, in tiles of a few MiB; the backward recomputes each tile. Labels are used as given:
    shift them beforehand for next-token prediction.

    Args:
        hidden: `(..., H)` final hidden states, fp32/bf16/fp16.
        weight: `(V, H)` head weight (the embedding matrix for tied heads).
        labels: `(...)` int64 in `[0, V)` or `ignore_index`.
        temperature: divides the (soft-capped) logits; must be positive.
        ignore_index: label of positions to skip; their outputs are 0.
        return_entropy: also return the entropy of `softmax(z)`; it is differentiable (for entropy bonuses).
        bias: `(V,)` head bias, or None.
        logit_scale: multiplies `l` before soft-capping, or None.
        softcap: final-logit soft-capping value, or None.
        return_accuracy: also return whether the label is the top-1 token (`argmax` of `z`, first index on ties).
        return_mean_logits: also return the mean of `z` over the vocabulary (no gradient; TRL's `logits/*` metrics).
        return_log_sum_sq_probs: also return `log sum_v p_v^2` (no gradient; DPO's WPO weights). These two are
            folded by the PyTorch row operations on every back end.
        backend: `"torch"`, `"triton"` or None (automatic).

    Returns:
        `logp`, fp32 `(...)`; with any `return_*`, the tuple `(logp, entropy, is_top1, mean_logits,
        log_sum_sq_probs)` restricted to what was asked, `is_top1` bool and the others fp32 `(...)`. Gradients reach
        `hidden`, `weight` and `bias` in their own dtypes.
    """
    _check_temperature(temperature)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden (..., H), weight (V, H), labels (...); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    kept = (flat_labels != ignore_index).nonzero().squeeze(1)
    dense = kept.numel() == flat_labels.numel()
    if not dense:
        flat_hidden, flat_labels = flat_hidden.index_select(0, kept), flat_labels.index_select(0, kept)

    ops = _row_ops(hidden.device, backend)
    if return_mean_logits or return_log_sum_sq_probs:
        ops = TorchRowOps  # the only back end that folds these sums
    wanted = (return_entropy, return_accuracy, return_mean_logits, return_log_sum_sq_probs)
    options = FusedHeadOptions(LogitTransform.of(temperature, logit_scale, softcap), ops, *wanted)
    outputs = FusedHeadLogprobs.apply(flat_hidden, weight, bias, flat_labels, options)

    def unflatten(x: torch.Tensor) -> torch.Tensor:
        return (x if dense else x.new_zeros(labels.numel()).index_copy(0, kept, x)).view(labels.shape)

    logp, *optional = (None if x is None else unflatten(x) for x in outputs)
    extras = [x for x, asked in zip(optional, wanted) if asked]
    return (logp, *extras) if extras else logp


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of `KL(policy || reference)` from sampled-token log-probs (Schulman's estimators).

    - `"k1"`: `logp - ref_logp` (unbiased, high variance, can be negative);
    - `"k2"`: `0.5 * (logp - ref_logp) ** 2`;
    - `"k3"`: `exp(ref_logp - logp) - (ref_logp - logp) - 1` (unbiased, non-negative; GRPO's `beta` term).

    Args:
        logp: policy log-probs, any shape.
        ref_logp: reference log-probs, same shape.
        kind: one of `"k1"`, `"k2"`, `"k3"`.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")


from .chunked_logprob import ChunkedLogProbFunction  # noqa: E402  (it builds on the names above)

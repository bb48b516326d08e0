"""TRL's `trl.kernels.chunked_logprob` path: `ChunkedLogProbFunction`, the fused LM head with TRL's arguments.

It is `FusedHeadLogprobs` (see `llm_trainer.kernels.token_logprobs`) with TRL's argument order and output order;
the tiling, the back ends and the gradients are that function's.
"""

from __future__ import annotations

import torch

from .logprob_torch import FusedHeadLogprobs, FusedHeadOptions, LogitTransform

__all__ = ["OPTIONAL_OUTPUTS", "TOKEN_CHUNK_SIZE", "ChunkedLogProbFunction"]

# TRL's tile height; accepted for compatibility, the tiles here are sized by `logprob_torch.TILE_ELEMENTS`
TOKEN_CHUNK_SIZE = 4096
# Per-token outputs besides the log-probabilities, each computed only when asked for
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class ChunkedLogProbFunction(FusedHeadLogprobs):
    """Per-token `log p(target)` under `hidden @ weight.T + bias`, without the `(N, V)` logits, as TRL's function.

    `apply(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,), temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)` returns `(logprobs, entropy,
    log_sum_sq_probs, mean_logits, is_top1)`, fp32 `(N,)` (`is_top1` bool), None for the fields not in `outputs`.
    The logits are `softcap * tanh(logit_scale * l / softcap) / temperature`. `logprobs` and `entropy` are
    differentiable with respect to `hidden`, `weight` and `bias`. `chunk_size` (TRL's vocabulary tile width) is
    accepted but the tiles are sized per device by the implementation.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ) -> tuple[torch.Tensor | None, ...]:
        from . import _check_temperature, _row_ops

        _check_temperature(temperature)
        unknown = set(outputs) - {"log_probs", *OPTIONAL_OUTPUTS}
        if unknown:
            raise ValueError(f"Unknown outputs {sorted(unknown)}; choose among {OPTIONAL_OUTPUTS}.")
        options = FusedHeadOptions(
            LogitTransform.of(temperature, logit_scale, final_logit_softcapping),
            _row_ops(hidden.device, None),
            *(name in outputs for name in ("entropy", "is_top1", "mean_logits", "log_sum_sq_probs")),
        )
        logp, entropy, is_top1, mean_logits, log_sum_sq_probs = FusedHeadLogprobs.forward(
            ctx, hidden, weight, bias, targets, options
        )
        return logp, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_):
        grad_hidden, grad_weight, grad_bias, *_ = FusedHeadLogprobs.backward(ctx, grad_logprobs, grad_entropy)
        return grad_hidden, grad_weight, grad_bias, *(None,) * 6

"""TRL's `trl.kernels.chunked_divergence` path: `ChunkedDivergenceFunction`, the distillation divergence between a
student's and a teacher's next-token distributions computed from their hidden states and LM heads.

The maths is `llm_trainer.losses.distillation.head_divergence` (the generalized JSD of both heads' transformed
logits); this autograd function runs it on chunks of tokens, keeping only per-token results, and recomputes each
chunk in the backward, so neither model's `(N, V)` logits are ever held whole.
"""

from __future__ import annotations

import torch

from ..losses.distillation import CHUNK_ELEMENTS, head_divergence
from . import LMHead

__all__ = ["TOKEN_CHUNK_SIZE", "VOCAB_CHUNK_SIZE", "ChunkedDivergenceFunction"]

# TRL's tile sizes; accepted for compatibility, the chunks here hold about `CHUNK_ELEMENTS` fp32 logits per model
TOKEN_CHUNK_SIZE = 4096
VOCAB_CHUNK_SIZE = 32768


def _chunks(num_tokens: int, vocab: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + rows) for start in range(0, num_tokens, rows)]


class ChunkedDivergenceFunction(torch.autograd.Function):
    """Per-token divergence between the student's and the teacher's next-token distributions, and the student's
    entropy, as TRL's function of the same name.

    `apply(student_hidden (N, H_s), student_weight (V, H_s), student_bias, teacher_hidden (N, H_t), teacher_weight
    (V, H_t), teacher_bias, beta, temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None,
    teacher_logit_scale=1.0, teacher_final_logit_softcapping=None)` returns `(divergence, entropy)`, fp32 `(N,)`.
    `beta` 0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher), in between the generalized
    JSD. Only the student's hidden states, weight and bias get gradients; the entropy has none.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        beta: float,
        temperature: float = 1.0,
        student_logit_scale: float = 1.0,
        student_final_logit_softcapping: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_final_logit_softcapping: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(
                f"The student head has {student_weight.shape[0]} vocabulary rows but the teacher's has "
                f"{teacher_weight.shape[0]}; distillation needs a shared vocabulary."
            )
        ctx.set_materialize_grads(False)
        ctx.args = (beta, temperature)
        ctx.transforms = (
            (student_logit_scale, student_final_logit_softcapping),
            (teacher_logit_scale, teacher_final_logit_softcapping),
        )
        student = LMHead(student_weight, student_bias, *ctx.transforms[0])
        teacher = LMHead(teacher_weight, teacher_bias, *ctx.transforms[1])
        divergence, entropy = [], []
        for rows in _chunks(student_hidden.shape[0], student_weight.shape[0]):
            d, e = head_divergence(student_hidden[rows], student, teacher_hidden[rows], teacher, *ctx.args)
            divergence.append(d)
            entropy.append(e)
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        divergence = torch.cat(divergence) if divergence else empty
        entropy = torch.cat(entropy) if entropy else empty.clone()
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
        )
        ctx.mark_non_differentiable(entropy)
        return divergence, entropy

    @staticmethod
    def backward(ctx, grad_divergence: torch.Tensor | None, _):
        if grad_divergence is None:
            return (None,) * 12
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(student_bias, dtype=torch.float32) if need_bias else None
        weight = student_weight.detach().requires_grad_(need_weight)
        bias = None if student_bias is None else student_bias.detach().requires_grad_(need_bias)
        student = LMHead(weight, bias, *ctx.transforms[0])
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
        teacher = LMHead(teacher_weight.detach(), teacher_bias, *ctx.transforms[1])
        for rows in _chunks(student_hidden.shape[0], student_weight.shape[0]):
            hidden = student_hidden[rows].detach().requires_grad_(need_hidden)
            wrt = [
                (x, acc)
                for x, acc in ((hidden, grad_hidden), (weight, grad_weight), (bias, grad_bias))
                if acc is not None
            ]
            with torch.enable_grad():
                divergence, _ = head_divergence(hidden, student, teacher_hidden[rows].detach(), teacher, *ctx.args)
                grads = torch.autograd.grad(divergence, [x for x, _ in wrt], grad_divergence[rows].float())
            for (x, acc), grad in zip(wrt, grads):
                (acc[rows] if x is hidden else acc).add_(grad.float())
        return (
            None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
            *(None,) * 9,
        )

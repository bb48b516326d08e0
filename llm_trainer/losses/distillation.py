"""Knowledge-distillation losses: the generalized Jensen-Shannon divergence between a student's and a teacher's
next-token distributions, as TRL 1.16's `DistillationTrainer`.

`beta` picks the divergence: 0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher), and
anything in between the generalized JSD with mixture m = (1 - beta) p_student + beta p_teacher:

    JSD_beta = beta KL(p_teacher || m) + (1 - beta) KL(p_student || m)

Both models' logits go through their own transform, `z = softcap * tanh(scale * l / softcap) / temperature`
(no `tanh` without a softcap, `scale` 1 when unset), before the softmax. `chunked_distillation_loss` starts from the
hidden states and LM heads and never materializes more than one `(chunk, vocab)` block of logits per model: each
chunk of tokens is projected, reduced and dropped, then recomputed in the backward.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels import LMHead

# fp32 logits per model in one chunk of tokens (rows * vocab), about 64 MiB
CHUNK_ELEMENTS = 1 << 24


def transform_logits(
    logits: torch.Tensor, temperature: float = 1.0, logit_scale: float | None = None, softcap: float | None = None
) -> torch.Tensor:
    """`softcap * tanh(logit_scale * logits / softcap) / temperature` in fp32 (each step skipped when unset)."""
    z = logits.float()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence between `softmax(student_logits)` and `softmax(teacher_logits)`, and the student entropy.

    Args:
        student_logits: `(..., V)` transformed student logits (see `transform_logits`).
        teacher_logits: `(..., V)` transformed teacher logits.
        beta: in [0, 1]; 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), else generalized JSD.

    Returns:
        `(divergence, entropy)`, fp32 `(...)`, in nats. Only the divergence carries a gradient.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}.")
    log_ps = student_logits.float().log_softmax(-1)
    log_pt = teacher_logits.float().log_softmax(-1)
    p_s = log_ps.exp()
    entropy = -(p_s * log_ps).sum(-1).detach()
    if beta == 0.0:
        divergence = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif beta == 1.0:
        divergence = (p_s * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
        kl_teacher = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_student = (p_s * (log_ps - log_m)).sum(-1)
        divergence = beta * kl_teacher + (1 - beta) * kl_student
    return divergence, entropy


def _head_logits(hidden: torch.Tensor, head: LMHead, temperature: float) -> torch.Tensor:
    """fp32 transformed logits of `hidden` under `head` (`hidden` rounded to the compute dtype first, as the forward
    pass would)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    logits = hidden.to(dtype).float() @ head.weight.to(dtype).float().t()
    logits = logits if head.bias is None else logits + head.bias.float()
    return transform_logits(logits, temperature, head.logit_scale, head.softcap)


def head_divergence(
    student_hidden: torch.Tensor,
    student: LMHead,
    teacher_hidden: torch.Tensor,
    teacher: LMHead,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row `generalized_jsd` of both heads' transformed logits, from hidden states `(n, H)`. Materializes `(n, V)`
    fp32 logits per model: call it on chunks of rows."""
    z_s = _head_logits(student_hidden, student, temperature)
    return generalized_jsd(z_s, _head_logits(teacher_hidden, teacher, temperature), beta)


def _chunk_divergence(*args) -> tuple[torch.Tensor, torch.Tensor]:
    divergence, entropy = head_divergence(*args)
    return divergence.sum(), entropy.sum()


def _kept_positions(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Check the distillation arguments and return the student's and (detached) teacher's hidden states at the masked
    positions, `(n, H)` each, the number of those positions and the chunk size (rows projected at a time)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}.")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"The student head has {student_weight.shape[0]} vocabulary rows but the teacher's has "
            f"{teacher_weight.shape[0]}; distillation needs a shared vocabulary."
        )
    if student_hidden.shape[:-1] != mask.shape or teacher_hidden.shape[:-1] != mask.shape:
        raise ValueError(
            f"expected hidden states (..., H) over the mask's shape {tuple(mask.shape)}; got student "
            f"{tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)}"
        )
    kept = mask.reshape(-1) != 0
    num_valid = kept.sum()
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[kept]
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[kept].detach()
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // student_weight.shape[0])
    return h_s, h_t, num_valid, chunk_size


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_logit_scale: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generalized JSD between the student and the teacher over the masked positions, from hidden states.

    Only the positions where `mask` is non-zero are projected through the heads, `chunk_size` rows at a time; each
    chunk's logits are recomputed in the backward rather than stored. The teacher gets no gradient.

    Args:
        student_hidden: `(..., H_s)` student hidden states aligned with the predicted tokens (before the head).
        student_weight: `(V, H_s)` student LM-head weight.
        teacher_hidden: `(..., H_t)` teacher hidden states at the same positions; the widths may differ.
        teacher_weight: `(V, H_t)` teacher LM-head weight; the vocabulary must match the student's.
        mask: `(...)`, 1 where the position is trained on.
        beta: 0 = forward KL, 1 = reverse KL, in between = generalized JSD.
        temperature: divides both models' (scaled, soft-capped) logits; must be positive.
        num_items_in_batch: divide the summed divergence by this (gradient-accumulation-correct); None divides by
            the number of masked positions here (at least 1).
        student_bias, teacher_bias: `(V,)` head biases, or None.
        student_logit_scale, teacher_logit_scale: multipliers of the raw logits (Cohere-style), or None.
        student_softcap, teacher_softcap: final-logit soft-capping values (Gemma-style), or None.
        chunk_size: rows projected at a time; None sizes chunks to about 64 MiB of fp32 logits per model.

    Returns:
        `(loss, entropy_sum, num_valid)`: the scalar loss, the summed student entropy (nats, no gradient) and the
        number of masked positions, so callers can reduce the entropy across processes.
    """
    h_s, h_t, num_valid, chunk_size = _kept_positions(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, beta, temperature, chunk_size
    )
    loss = student_hidden.new_zeros((), dtype=torch.float32)
    entropy = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    student = LMHead(student_weight, student_bias, student_logit_scale, student_softcap)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    teacher = LMHead(teacher_weight.detach(), teacher_bias, teacher_logit_scale, teacher_softcap)
    for start in range(0, h_s.shape[0], chunk_size):
        end = start + chunk_size
        chunk_loss, chunk_entropy = checkpoint(
            _chunk_divergence, h_s[start:end], student, h_t[start:end], teacher, beta, temperature, use_reentrant=False
        )
        loss = loss + chunk_loss
        entropy = entropy + chunk_entropy
    if h_s.shape[0] == 0:  # keep the graph connected to the student so backward still runs
        loss = loss + 0.0 * student_hidden.sum()
    if num_items_in_batch is None:
        loss = loss / num_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.detach(), num_valid


class _DivergenceGradInForward(torch.autograd.Function):
    """The summed chunk divergences, with their gradients taken chunk by chunk during the forward (each chunk's
    logits are built once, then dropped); the backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h_s, weight, bias, h_t, teacher: LMHead, student_options, beta, temperature, chunk_size):
        needs = (h_s.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grad_h = torch.zeros_like(h_s) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        entropy = torch.zeros((), dtype=torch.float32, device=h_s.device)
        w = weight.detach().requires_grad_(needs[1])
        b = None if bias is None else bias.detach().requires_grad_(needs[2])
        student = LMHead(w, b, *student_options)
        for start in range(0, h_s.shape[0], chunk_size):
            end = start + chunk_size
            with torch.enable_grad():
                h = h_s[start:end].detach().requires_grad_(needs[0])
                divergence, chunk_entropy = head_divergence(h, student, h_t[start:end], teacher, beta, temperature)
                chunk_loss = divergence.sum()
                wanted = [(x, i) for i, x in enumerate((h, w, b)) if needs[i]]
                if wanted:
                    grads = torch.autograd.grad(chunk_loss, [x for x, _ in wanted])
                    for grad, (_, i) in zip(grads, wanted):
                        if i == 0:
                            grad_h[start:end] = grad
                        elif i == 1:
                            grad_w += grad
                        else:
                            grad_b += grad
            loss = loss + chunk_loss.detach()
            entropy = entropy + chunk_entropy.sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(entropy)
        return loss, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.float()
        grad_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_logit_scale: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunked_distillation_loss` (same arguments and results) with each chunk's gradient taken in the forward.

    Each chunk's `(chunk, vocab)` logits are built once: the gradients with respect to the student's hidden states
    (kept, `(n, H)`) and head weight (accumulated, `(V, H)` fp32) are computed right away, so the backward only
    scales them instead of recomputing every chunk. Worth it when the loss is backpropagated (training); the result
    is the same as `chunked_distillation_loss`'s within float32 rounding.
    """
    h_s, h_t, num_valid, chunk_size = _kept_positions(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, beta, temperature, chunk_size
    )
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    teacher = LMHead(teacher_weight.detach(), teacher_bias, teacher_logit_scale, teacher_softcap)
    loss, entropy = _DivergenceGradInForward.apply(
        h_s,
        student_weight,
        student_bias,
        h_t,
        teacher,
        (student_logit_scale, student_softcap),
        beta,
        temperature,
        chunk_size,
    )
    if h_s.shape[0] == 0:  # keep the graph connected to the student so backward still runs
        loss = loss + 0.0 * student_hidden.sum()
    if num_items_in_batch is None:
        loss = loss / num_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.detach(), num_valid

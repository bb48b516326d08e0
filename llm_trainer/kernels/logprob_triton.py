"""Triton row operations: online log-sum-exp, label gather, entropy and top-1 in one pass; the gradient in place.

`TritonRowOps` fulfils the `RowOps` contract of `logprob_torch`: the LM-head GEMMs stay in cuBLAS, and these
kernels do the row-wise work on each fp32 logits tile (Liger-style). Every load is cast to fp32 before any
arithmetic, which is also what makes the kernels exact under `TRITON_INTERPRET=1` on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprob_torch import RowGrad, RowStats

# Columns a program handles per step: the fold walks its row in such blocks, the gradient gives each block a program
BLOCK = 2048


@triton.jit
def _capped(x, softcap_post, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1
        x = softcap_post * (2 * tl.sigmoid(2 * x) - 1)
    return x


@triton.jit
def _fold_kernel(
    x_ptr,
    x_row_stride,
    n_cols,
    col0,
    scale,
    softcap_post,
    target_ptr,
    max_ptr,
    sum_ptr,
    ent_ptr,
    picked_ptr,
    argmax_ptr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row: fold columns [col0, col0 + n_cols) of z into the row's running statistics
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * x_row_stride
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + row)
    if HAS_ARGMAX:
        best = tl.load(argmax_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = _capped(tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32) * scale, softcap_post, HAS_SOFTCAP)
        z = tl.where(inside, z, -float("inf"))
        block_max = tl.max(z, 0)
        if HAS_ARGMAX:
            # Strictly greater: on a tie the earlier column stays the argmax, as in `torch.argmax`
            best = tl.where(block_max > m, col0 + start + tl.argmax(z, 0), best)
        new_m = tl.maximum(m, block_max)
        rescale = tl.exp(m - new_m)
        d = z - new_m
        e = tl.exp(d)
        if HAS_ENTROPY:
            # Re-centre sum(e^(z-m) (z-m)) on the new maximum; nothing to re-centre before the first block
            shift = tl.where(s > 0, m - new_m, 0.0)
            ent = rescale * (ent + shift * s) + tl.sum(e * tl.where(inside, d, 0.0), 0)
        s = s * rescale + tl.sum(e, 0)
        m = new_m
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    if HAS_ENTROPY:
        tl.store(ent_ptr + row, ent)
    if HAS_ARGMAX:
        tl.store(argmax_ptr + row, best)
    if HAS_TARGET:
        local = tl.load(target_ptr + row) - col0
        if (local >= 0) & (local < n_cols):
            x = tl.load(row_ptr + local).to(tl.float32) * scale
            tl.store(picked_ptr + row, _capped(x, softcap_post, HAS_SOFTCAP))


@triton.jit
def _grad_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    out_row_stride,
    n_cols,
    col0,
    scale,
    softcap_post,
    lse_ptr,
    ent_ptr,
    grad_ent_ptr,
    target_ptr,
    grad_target_ptr,
    n_targets,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    TARGETS_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (row, column block): d loss / dx from d log p_t / dz = onehot_t - p and dH/dz = -p (log p + H)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32) * scale
    if HAS_SOFTCAP:
        tanh = 2 * tl.sigmoid(2 * x) - 1
        z = softcap_post * tanh
    else:
        z = x
    log_p = z - tl.load(lse_ptr + row)
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK,), tl.float32)
    if HAS_TARGETS:
        k = tl.arange(0, TARGETS_BLOCK)
        targets = tl.load(target_ptr + row * n_targets + k, mask=k < n_targets, other=-1)
        g = tl.load(grad_target_ptr + row * n_targets + k, mask=k < n_targets, other=0.0)
        onehot = (cols[:, None] + col0) == targets[None, :]
        grad += tl.sum(tl.where(onehot, g[None, :], 0.0), 1) - tl.sum(g, 0) * p
    if HAS_ENT_GRAD:
        grad -= tl.load(grad_ent_ptr + row) * p * (log_p + tl.load(ent_ptr + row))
    if HAS_SOFTCAP:
        grad *= 1 - tanh * tanh
    tl.store(out_ptr + row * out_row_stride + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fold(
    x: torch.Tensor,
    col0: int,
    stats: RowStats,
    targets: torch.Tensor | None,
    softcap_post: float | None,
    scale: float = 1.0,
) -> None:
    x = _unit_stride(x)
    rows, cols = x.shape
    if rows == 0:
        return
    unused = stats.max  # any tensor fills the pointer slots a constexpr flag turns off
    _fold_kernel[(rows,)](
        x,
        x.stride(0),
        cols,
        col0,
        scale,
        1.0 if softcap_post is None else softcap_post,
        unused if targets is None else targets,
        stats.max,
        stats.sum_exp,
        unused if stats.ent is None else stats.ent,
        unused if stats.target is None else stats.target,
        unused if stats.argmax is None else stats.argmax,
        HAS_SOFTCAP=softcap_post is not None,
        HAS_TARGET=stats.target is not None,
        HAS_ENTROPY=stats.ent is not None,
        HAS_ARGMAX=stats.argmax is not None,
        BLOCK=min(BLOCK, triton.next_power_of_2(cols)),
    )


def _grad(
    x: torch.Tensor, out: torch.Tensor, col0: int, row_grad: RowGrad, softcap_post: float | None, scale: float = 1.0
) -> None:
    x = _unit_stride(x)
    rows, cols = x.shape
    if rows == 0:
        return
    block = min(BLOCK, triton.next_power_of_2(cols))
    lse, grad_entropy, grad_targets = row_grad.lse, row_grad.grad_entropy, row_grad.grad_targets
    n_targets = 0 if grad_targets is None else grad_targets.shape[1]
    _grad_kernel[(rows, triton.cdiv(cols, block))](
        x,
        x.stride(0),
        out,
        out.stride(0),
        cols,
        col0,
        scale,
        1.0 if softcap_post is None else softcap_post,
        lse,
        lse if row_grad.entropy is None else row_grad.entropy,
        lse if grad_entropy is None else grad_entropy.contiguous(),
        lse if grad_targets is None else row_grad.targets.contiguous(),
        lse if grad_targets is None else grad_targets.contiguous(),
        n_targets,
        HAS_SOFTCAP=softcap_post is not None,
        HAS_TARGETS=grad_targets is not None,
        HAS_ENT_GRAD=grad_entropy is not None,
        TARGETS_BLOCK=triton.next_power_of_2(max(n_targets, 1)),
        BLOCK=block,
    )


class TritonRowOps:
    """`RowOps` in Triton: one kernel launch per tile, and one per row block for whole logits."""

    @staticmethod
    def fold(
        tile: torch.Tensor, col0: int, stats: RowStats, targets: torch.Tensor | None, softcap_post: float | None
    ) -> None:
        _fold(tile, col0, stats, targets, softcap_post)

    @staticmethod
    def grad(tile: torch.Tensor, col0: int, rows: RowGrad, softcap_post: float | None) -> None:
        _grad(tile, tile, col0, rows, softcap_post)

    @staticmethod
    def row_stats(
        logits: torch.Tensor, scale: float, entropy: bool, rows_per_chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        stats = RowStats.empty(logits.shape[0], logits.device, entropy, target=False, argmax=False)
        _fold(logits, 0, stats, None, None, scale)
        return stats.logsumexp(), stats.entropy() if entropy else None

    @staticmethod
    def row_grad(logits: torch.Tensor, scale: float, rows: RowGrad, out: torch.Tensor) -> None:
        _grad(logits, out, 0, rows, None, scale)

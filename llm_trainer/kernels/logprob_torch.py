"""Chunked log-prob, entropy and top-1 maths: the autograd functions and the PyTorch row operations.

The autograd functions never hold a `(tokens, vocab)` array in fp32. They walk the logits in tiles and hand each
tile to a *row-ops* back end, which folds it into running per-row statistics (online log-sum-exp) in the forward
and overwrites it with the gradient of the logits in the backward. `TorchRowOps` is that back end in PyTorch (CPU,
and any device); `logprob_triton.TritonRowOps` fulfils the same contract with Triton kernels.

Tile contract: a tile holds fp32 values `x`, and the logits the softmax sees are `z = x`, or with soft-capping
`z = softcap_post * tanh(x)`. `fold` may overwrite the tile. `grad` overwrites it with `d loss / d x` for
`loss = sum_k g_k log p(target_k) + g_H H`; the caller has already multiplied the per-row `g`s by the chain-rule
factor from `x` to whatever produced it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from packaging.version import Version

# Elements of one fp32 logits tile, and its widest vocabulary slice, per device type. On CPU, 16 MiB tiles keep the
# number of parallel regions (each a thread barrier, costly on a loaded machine) low while staying in the last-level
# cache; a GPU needs larger tiles to keep its GEMMs efficient.
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
TILE_COLUMNS = {"cpu": 4096, "cuda": 16384}
# `torch.addmm(..., out_dtype=torch.float32)`: half-precision GEMMs with an fp32 result (CUDA)
_HALF_MM_TO_FP32 = Version(torch.__version__).release >= (2, 8)


class _Rows:
    """Per-row tensors (None where unused), sliced together: `rows[a:b]`."""

    def __getitem__(self, rows: slice):
        return type(self)(*(None if t is None else t[rows] for t in vars(self).values()))


@dataclass
class RowStats(_Rows):
    """Running per-row statistics of `z` over the vocabulary columns folded so far, each of shape `(rows,)`.

    `max` and `sum_exp` give the log-sum-exp; `ent` is `sum(exp(z - max) * (z - max))`, for the entropy; `target`
    is the label's `z` and `argmax` the first column holding the row maximum. Unrequested fields are None.
    """

    max: torch.Tensor
    sum_exp: torch.Tensor
    ent: torch.Tensor | None = None
    target: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    sum_z: torch.Tensor | None = None
    sum_exp2: torch.Tensor | None = None

    @classmethod
    def empty(
        cls,
        rows: int,
        device: torch.device,
        entropy: bool,
        target: bool,
        argmax: bool,
        sum_z: bool = False,
        sum_exp2: bool = False,
    ) -> RowStats:
        """Statistics of nothing folded yet: `max = -inf`, sums 0."""

        def zeros(wanted: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            return torch.zeros(rows, device=device, dtype=dtype) if wanted else None

        neg_inf = torch.full((rows,), float("-inf"), device=device, dtype=torch.float32)
        return cls(
            neg_inf, zeros(), zeros(entropy), zeros(target), zeros(argmax, torch.long), zeros(sum_z), zeros(sum_exp2)
        )

    def logsumexp(self) -> torch.Tensor:
        return self.max + self.sum_exp.log()

    def entropy(self) -> torch.Tensor:
        return self.sum_exp.log() - self.ent / self.sum_exp

    def log_sum_sq_probs(self) -> torch.Tensor:
        """`log sum_v p_v^2`: with both sums taken relative to the running max, the max cancels."""
        return self.sum_exp2.log() - 2 * self.sum_exp.log()


@dataclass
class RowGrad(_Rows):
    """What the backward needs per row: the log-sum-exp `lse` of `z`; the `entropy` and its gradient `grad_entropy`
    when the entropy gets one; the `targets (rows, K)` and their gradients `grad_targets` when the log-probs get one."""

    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    grad_entropy: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    grad_targets: torch.Tensor | None = None


class RowOps(Protocol):
    """A back end: tile passes for the fused head, whole-row passes for logits that already exist."""

    @staticmethod
    def fold(
        tile: torch.Tensor, col0: int, stats: RowStats, targets: torch.Tensor | None, softcap_post: float | None
    ) -> None:
        """Fold `tile (rows, cols)`, vocabulary columns `col0 ...`, into `stats`; `targets (rows,)` if picked."""

    @staticmethod
    def grad(tile: torch.Tensor, col0: int, rows: RowGrad, softcap_post: float | None) -> None:
        """Overwrite `tile` with `d loss / d x`."""

    @staticmethod
    def row_stats(
        logits: torch.Tensor, scale: float, entropy: bool, rows_per_chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-sum-exp and entropy (if asked) of `z = scale * logits` for `logits (rows, V)`."""

    @staticmethod
    def row_grad(logits: torch.Tensor, scale: float, rows: RowGrad, out: torch.Tensor) -> None:
        """Write `d loss / d logits` into `out`, a `(rows, V)` array of the logits' dtype."""


def tile_shape(rows: int, cols: int, device: torch.device) -> tuple[int, int]:
    """Rows and vocabulary columns of one logits tile, for `rows` tokens and a vocabulary of `cols`."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    width = min(cols, TILE_COLUMNS[kind])
    return max(1, min(rows, TILE_ELEMENTS[kind] // width)), width


def _tile_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)


def _mm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """GEMM operand dtype. On CUDA: the autocast dtype, else the inputs' shared dtype, with an fp32 result. fp32
    elsewhere (CPU GEMMs cannot return fp32 from half-precision operands)."""
    if not (hidden.is_cuda and _HALF_MM_TO_FP32):
        return torch.float32
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32


def _addmm_(
    out: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0, alpha: float = 1.0
) -> torch.Tensor:
    """`out = beta * base + alpha * a @ b` in the fp32 `out`; `a` and `b` share a dtype."""
    if a.dtype == torch.float32:
        return torch.addmm(base, a, b, beta=beta, alpha=alpha, out=out)
    return torch.addmm(base, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=out)


def _load_scaled(tile: torch.Tensor, source: torch.Tensor, scale: float) -> torch.Tensor:
    tile.copy_(source)
    return tile if scale == 1.0 else tile.mul_(scale)


def _sliced(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if x is None else x[part]


# ----------------------------------------------------------------------------------------------------------------
# PyTorch row operations
# ----------------------------------------------------------------------------------------------------------------


class TorchRowOps:
    """`RowOps` in PyTorch: a few in-place passes over each tile, and whole logits in fp32 chunks of rows."""

    @staticmethod
    def fold(
        tile: torch.Tensor, col0: int, stats: RowStats, targets: torch.Tensor | None, softcap_post: float | None
    ) -> None:
        cols = tile.shape[1]
        if softcap_post is not None:
            tile.tanh_().mul_(softcap_post)
        if stats.sum_z is not None:
            stats.sum_z.add_(tile.sum(1))
        if stats.target is not None:
            local = targets - col0
            picked = tile.gather(1, local.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
            stats.target.copy_(torch.where((local >= 0) & (local < cols), picked, stats.target))
        if stats.argmax is None:
            tile_max, tile_argmax = tile.amax(1), None
        else:
            tile_max, tile_argmax = tile.max(1)
        first = col0 == 0
        new_max = tile_max if first else torch.maximum(stats.max, tile_max)
        tile.sub_(new_max.unsqueeze(1))
        if stats.ent is None:
            exp = tile.exp_()
            tile_sum, tile_ent = exp.sum(1), None
        else:
            exp = tile.exp()
            tile_sum, tile_ent = exp.sum(1), tile.mul_(exp).sum(1)
        tile_sum2 = None if stats.sum_exp2 is None else exp.square().sum(1)
        if first:
            if tile_sum2 is not None:
                stats.sum_exp2.copy_(tile_sum2)
            stats.sum_exp.copy_(tile_sum)
            if tile_ent is not None:
                stats.ent.copy_(tile_ent)
            if tile_argmax is not None:
                stats.argmax.copy_(tile_argmax)
        else:
            shift = stats.max - new_max
            rescale = shift.exp()
            if tile_ent is not None:
                # Re-centre on the new maximum: e^(z-m') (z-m') = r e^(z-m) ((z-m) + (m-m')), r = e^(m-m')
                stats.ent.add_(shift * stats.sum_exp).mul_(rescale).add_(tile_ent)
            stats.sum_exp.mul_(rescale).add_(tile_sum)
            if tile_sum2 is not None:
                stats.sum_exp2.mul_(rescale.square()).add_(tile_sum2)
            if tile_argmax is not None:
                # Strictly greater: on a tie the earlier column stays the argmax, as in `torch.argmax`
                stats.argmax.copy_(torch.where(tile_max > stats.max, tile_argmax + col0, stats.argmax))
        stats.max.copy_(new_max)

    @staticmethod
    def grad(tile: torch.Tensor, col0: int, rows: RowGrad, softcap_post: float | None) -> None:
        # d log p_t / dz = onehot_t - p and dH / dz = -p (log p + H)
        entropy, grad_entropy, targets, grad_targets = rows.entropy, rows.grad_entropy, rows.targets, rows.grad_targets
        dtanh = None
        if softcap_post is not None:
            tanh = tile.tanh_()
            dtanh = torch.mul(tanh, tanh).neg_().add_(1)
            tile.mul_(softcap_post)
        log_p = tile.sub_(rows.lse.unsqueeze(1))
        grad_p = None if grad_targets is None else grad_targets.sum(1)
        if grad_entropy is None:
            log_p.exp_().mul_(-grad_p.unsqueeze(1))
        else:
            # -p (g + g_H (log p + H)) = p (c - g_H log p), with c = -(g + g_H H)
            p = log_p.exp()
            coef = grad_entropy * entropy if grad_p is None else grad_p + grad_entropy * entropy
            torch.addcmul(coef.neg_().unsqueeze(1), log_p, -grad_entropy.unsqueeze(1), out=tile)
            tile.mul_(p)
        if grad_targets is not None:
            cols = tile.shape[1]
            local = targets - col0
            hits = torch.where((local >= 0) & (local < cols), grad_targets, 0.0)
            tile.scatter_add_(1, local.clamp(0, cols - 1), hits)
        if dtanh is not None:
            tile.mul_(dtanh)

    @staticmethod
    def row_stats(
        logits: torch.Tensor, scale: float, entropy: bool, rows_per_chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, vocab = logits.shape
        chunk = rows_per_chunk or _rows_per_chunk(vocab, logits.device)
        stats = RowStats.empty(rows, logits.device, entropy, target=False, argmax=False)
        buffer = torch.empty(min(rows, chunk) * vocab, device=logits.device, dtype=torch.float32)
        for start in range(0, rows, chunk):
            block = logits[start : start + chunk]
            tile = _load_scaled(_tile_view(buffer, block.shape[0], vocab), block, scale)
            TorchRowOps.fold(tile, 0, stats[start : start + chunk], None, None)
        return stats.logsumexp(), stats.entropy() if entropy else None

    @staticmethod
    def row_grad(logits: torch.Tensor, scale: float, rows: RowGrad, out: torch.Tensor) -> None:
        num_rows, vocab = logits.shape
        chunk = _rows_per_chunk(vocab, logits.device)
        # fp32 gradients are built in `out` itself; other dtypes in fp32 scratch, rounded once
        buffer = None
        if out.dtype != torch.float32:
            buffer = torch.empty(min(num_rows, chunk) * vocab, device=out.device, dtype=torch.float32)
        for start in range(0, num_rows, chunk):
            block = slice(start, start + chunk)
            tile = out[block] if buffer is None else _tile_view(buffer, out[block].shape[0], vocab)
            TorchRowOps.grad(_load_scaled(tile, logits[block], scale), 0, rows[block], None)
            if buffer is not None:
                out[block].copy_(tile)


def _rows_per_chunk(vocab: int, device: torch.device) -> int:
    return max(1, TILE_ELEMENTS["cuda" if device.type == "cuda" else "cpu"] // vocab)


# ----------------------------------------------------------------------------------------------------------------
# Autograd functions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """How the head output `l = hidden @ weight.T + bias` becomes the logits `z` of the softmax.

    `z = scale * l / temperature`, or with soft-capping `z = softcap * tanh(scale * l / softcap) / temperature`.
    A tile holds `x = gemm_alpha * l` (the factor rides on the GEMM), `z = softcap_post * tanh(x)` when capped, and
    `chain` is `dz / dl` but for the `tanh'` factor.
    """

    gemm_alpha: float
    softcap_post: float | None
    chain: float

    @classmethod
    def of(cls, temperature: float, logit_scale: float | None, softcap: float | None) -> LogitTransform:
        scale = 1.0 if logit_scale is None else float(logit_scale)
        if softcap is None:
            return cls(scale / temperature, None, scale / temperature)
        return cls(scale / softcap, softcap / temperature, scale / temperature)


@dataclass(frozen=True)
class FusedHeadOptions:
    """How `FusedHeadLogprobs` runs: the logit transform, the row-ops back end, and the optional per-token outputs
    (entropy, top-1 flags, mean logits, `log sum_v p_v^2`) it also computes."""

    transform: LogitTransform
    ops: RowOps
    entropy: bool = False
    top1: bool = False
    mean_logits: bool = False
    log_sum_sq_probs: bool = False


def _project(
    buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """The fp32 tile `alpha * hidden @ weight.T + bias` in `buffer`; `bias` comes pre-scaled by `alpha`."""
    tile = _tile_view(buffer, hidden.shape[0], weight.shape[0])
    _addmm_(tile, tile, hidden, weight.T, beta=0.0, alpha=alpha)
    return tile if bias is None else tile.add_(bias)


class FusedHeadLogprobs(torch.autograd.Function):
    """Per-token `log p(target)` under the head `hidden @ weight.T + bias`, with entropy and top-1 flags if asked.

    Takes `hidden (n, H)`, `weight (V, H)`, `bias (V,)` or None, `targets (n,)` in `[0, V)` and the
    `FusedHeadOptions`; returns `(logp, entropy, is_top1, mean_logits, log_sum_sq_probs)`. The forward walks
    `(rows, cols)` logits tiles vocabulary-major and keeps per-token statistics only. The backward recomputes each
    tile, turns it into the logits gradient in place and adds it into `d hidden`, `d weight` and `d bias` at once,
    so the peak is one tile on top of the gradients themselves.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, options
    ) -> tuple[torch.Tensor | None, ...]:
        transform, ops, entropy, top1 = options.transform, options.ops, options.entropy, options.top1
        mean_logits, log_sum_sq_probs = options.mean_logits, options.log_sum_sq_probs
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        rows, cols = tile_shape(n, vocab, hidden.device)
        ctx.mm_dtype = mm_dtype = _mm_dtype(hidden, weight)
        stats = RowStats.empty(
            n, hidden.device, entropy, target=True, argmax=top1, sum_z=mean_logits, sum_exp2=log_sum_sq_probs
        )
        buffer = torch.empty(rows * cols, device=hidden.device, dtype=torch.float32)
        bias_x = None if bias is None else bias.float() * transform.gemm_alpha
        with torch.autocast(hidden.device.type, enabled=False):
            for col0 in range(0, vocab, cols):
                w = weight[col0 : col0 + cols].to(mm_dtype)
                b = _sliced(bias_x, slice(col0, col0 + cols))
                for row0 in range(0, n, rows):
                    block = slice(row0, row0 + rows)
                    tile = _project(buffer, hidden[block].to(mm_dtype), w, b, transform.gemm_alpha)
                    ops.fold(tile, col0, stats[block], targets[block], transform.softcap_post)
        lse = stats.logsumexp()
        ent = stats.entropy() if entropy else None
        is_top1 = stats.argmax == targets if top1 else None
        mean = stats.sum_z / vocab if mean_logits else None
        sum_sq = stats.log_sum_sq_probs() if log_sum_sq_probs else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.options = options
        ctx.mark_non_differentiable(*(x for x in (is_top1, mean, sum_sq) if x is not None))
        return stats.target - lse, ent, is_top1, mean, sum_sq

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        transform: LogitTransform = ctx.options.transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        (n, width), vocab = hidden.shape, weight.shape[0]
        rows, cols = tile_shape(n, vocab, hidden.device)
        mm_dtype = ctx.mm_dtype
        g_logp = None if grad_logp is None else (grad_logp.float() * transform.chain).unsqueeze(1)
        g_ent = None if grad_entropy is None else grad_entropy.float() * transform.chain
        row_grad = RowGrad(lse, ent, g_ent, targets.unsqueeze(1), g_logp)
        buffer = torch.empty(rows * cols, device=hidden.device, dtype=torch.float32)
        bias_x = None if bias is None else bias.float() * transform.gemm_alpha

        fp32 = {"device": hidden.device, "dtype": torch.float32}
        # The sums start with `beta=0` GEMMs, so only an empty batch needs zeroed gradients
        grad_hidden = torch.empty(n, width, **fp32) if need_hidden else None
        grad_weight = (torch.empty_like if n else torch.zeros_like)(weight) if need_weight else None
        # Other weight dtypes: each vocabulary slice of `d weight` is summed in fp32, then stored once
        weight_acc = None if not need_weight or weight.dtype == torch.float32 else torch.empty(cols, width, **fp32)
        grad_bias = torch.zeros(vocab, **fp32) if need_bias else None

        with torch.autocast(hidden.device.type, enabled=False):
            for col0 in range(0, vocab, cols):
                vocab_slice = slice(col0, col0 + cols)
                w = weight[vocab_slice].to(mm_dtype)
                b = _sliced(bias_x, vocab_slice)
                if need_weight:
                    dw = grad_weight[vocab_slice] if weight_acc is None else weight_acc[: w.shape[0]]
                for row0 in range(0, n, rows):
                    block = slice(row0, row0 + rows)
                    h = hidden[block].to(mm_dtype)
                    tile = _project(buffer, h, w, b, transform.gemm_alpha)
                    ctx.options.ops.grad(tile, col0, row_grad[block], transform.softcap_post)
                    g = tile.to(mm_dtype)
                    if need_hidden:
                        _addmm_(grad_hidden[block], grad_hidden[block], g, w, beta=float(col0 > 0))
                    if need_weight:
                        _addmm_(dw, dw, g.T, h, beta=float(row0 > 0))
                    if need_bias:
                        grad_bias[vocab_slice] += tile.sum(0)
                if weight_acc is not None and n:
                    grad_weight[vocab_slice].copy_(dw)

        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            grad_weight,
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def _row_blocks(x: torch.Tensor) -> list[torch.Tensor]:
    """`x (..., V)` as 2-D `(rows, V)` blocks in row-major order, views all: a sliced batch is not copied."""
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        return [block for part in x.unbind(0) for block in _row_blocks(part)]


def _blockwise_stats(
    ops: RowOps, logits: torch.Tensor, scale: float, entropy: bool, rows_per_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    stats = [ops.row_stats(block, scale, entropy, rows_per_chunk) for block in _row_blocks(logits)]
    lse, ent = zip(*stats)
    return torch.cat(lse), torch.cat(ent) if entropy else None


def _blockwise_grad(ops: RowOps, logits: torch.Tensor, scale: float, row_grad: RowGrad) -> torch.Tensor:
    """`d loss / d logits` as a new contiguous array of the logits' shape and dtype."""
    out = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    flat_out, row0 = out.view(-1, out.shape[-1]), 0
    for block in _row_blocks(logits):
        rows = slice(row0, row0 + block.shape[0])
        ops.row_grad(block, scale, row_grad[rows], flat_out[rows])
        row0 = rows.stop
    return out


def _half_in_dtype(logits: torch.Tensor, ops: RowOps) -> bool:
    """Whether the values come from `log_softmax` in the logits' own half-precision dtype.

    The PyTorch back end mirrors TRL's non-Triton path, which computes bf16/fp16 logits that way, so that values
    match TRL's bit for bit; the backward still works from an fp32 log-sum-exp.
    """
    return ops is TorchRowOps and logits.dtype in (torch.float16, torch.bfloat16)


def _row_chunks(logits: torch.Tensor, rows_per_chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """`(rows, chunk)` pairs covering `logits (..., V)` in row-major order: 2-D views of at most `rows_per_chunk`
    rows and their span in the flattened rows."""
    row0 = 0
    for block in _row_blocks(logits):
        for start in range(0, block.shape[0], rows_per_chunk):
            chunk = block[start : start + rows_per_chunk]
            yield slice(row0 + start, row0 + start + chunk.shape[0]), chunk
        row0 += block.shape[0]


def _half_log_softmax(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    return (chunk if temperature == 1.0 else chunk / temperature).log_softmax(-1)


class _FunctionOfLogits(torch.autograd.Function):
    """The backward of `SelectiveLogSoftmax` and `Entropy`. Their forwards save the logits (no copy), the gathered
    `index` (None for the entropy) and the fp32 row statistics `lse`, `entropy` (None where a half-precision forward
    on the PyTorch back end left them to the backward, which folds them here), and `ctx.fold`: the back end, scale,
    whether the entropy is needed and the rows per chunk."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, index, lse, ent = ctx.saved_tensors
        ops, scale, entropy, rows_per_chunk = ctx.fold
        if lse is None:
            lse, ent = _blockwise_stats(ops, logits, scale, entropy, rows_per_chunk)
        if index is None:
            row_grad = RowGrad(lse, ent, grad.float().flatten())
        else:
            k = index.shape[-1]
            row_grad = RowGrad(lse, targets=index.reshape(-1, k), grad_targets=(grad.float() * scale).reshape(-1, k))
        return _blockwise_grad(ops, logits, scale, row_grad), None, None, None


class SelectiveLogSoftmax(_FunctionOfLogits):
    """`log_softmax(logits / temperature)` gathered at `index (..., K)`, from per-row log-sum-exps only.

    Saves the logits themselves (no copy) and at most one fp32 log-sum-exp per row. fp32/fp64 rows are reduced by
    the row-ops back end. bf16/fp16 rows: the Triton back end reduces them in fp32 and rounds once; the PyTorch one
    takes `log_softmax` in their own dtype, a bounded chunk of rows at a time, and leaves the log-sum-exp to the
    backward. Either way the gradient is built in fp32 and rounded once.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, temperature: float, ops: RowOps) -> torch.Tensor:
        scale = 1.0 / temperature
        if _half_in_dtype(logits, ops):
            k = index.shape[-1]
            logps = torch.empty(index.shape, device=logits.device, dtype=logits.dtype)
            flat_logps, flat_index = logps.view(-1, k), index.reshape(-1, k)
            for rows, chunk in _row_chunks(logits, _rows_per_chunk(logits.shape[-1], logits.device)):
                torch.gather(_half_log_softmax(chunk, temperature), -1, flat_index[rows], out=flat_logps[rows])
            lse = None
        else:
            lse, _ = _blockwise_stats(ops, logits, scale, entropy=False)
            picked = logits.gather(-1, index).float()
            if scale != 1.0:
                picked.mul_(scale)
            logps = (picked - lse.view(*index.shape[:-1], 1)).to(logits.dtype)
        ctx.save_for_backward(logits, index, lse, None)
        ctx.fold = (ops, scale, False, None)
        return logps


class Entropy(_FunctionOfLogits):
    """Entropy in nats of `softmax(logits)` along the last axis, from one pass over each chunk of rows.

    bf16/fp16 logits on the PyTorch back end: `-(p * log p).sum(-1)` in their own dtype, `log p` from `log_softmax`
    (TRL's non-Triton values); the fp32 statistics the backward needs are folded there, on demand.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows_per_chunk: int | None, ops: RowOps) -> torch.Tensor:
        if _half_in_dtype(logits, ops):
            entropy = torch.empty(logits.shape[:-1], device=logits.device, dtype=logits.dtype)
            flat_entropy, stats = entropy.view(-1), (None, None)
            chunk_rows = rows_per_chunk or _rows_per_chunk(logits.shape[-1], logits.device)
            for rows, chunk in _row_chunks(logits, chunk_rows):
                log_p = chunk.log_softmax(-1)
                torch.sum(log_p.exp().mul_(log_p), -1, out=flat_entropy[rows])
            entropy.neg_()
        else:
            stats = _blockwise_stats(ops, logits, 1.0, True, rows_per_chunk)
            entropy = stats[1].view(logits.shape[:-1]).to(logits.dtype)
        ctx.save_for_backward(logits, None, *stats)
        ctx.fold = (ops, 1.0, True, rows_per_chunk)
        return entropy


class SelectiveLogSoftmaxAndEntropy(torch.autograd.Function):
    """`log_softmax(scale * logits)` gathered at `index (..., 1)` and the entropy of `softmax(scale * logits)`, from
    one pass over each row (the log-sum-exp and the entropy are folded together).

    Returns both as fp32 `(...)`. Saves the logits (no copy) and two fp32 numbers per row; the backward builds the
    logits gradient of whichever outputs received one, in one more pass.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, index: torch.Tensor, scale: float, ops: RowOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        lse, ent = _blockwise_stats(ops, logits, scale, entropy=True)
        picked = logits.gather(-1, index).float().squeeze(-1)
        if scale != 1.0:
            picked.mul_(scale)
        ctx.save_for_backward(logits, index, lse, ent)
        ctx.scale, ctx.ops = scale, ops
        shape = index.shape[:-1]
        return picked - lse.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        logits, index, lse, ent = ctx.saved_tensors
        scale = ctx.scale
        grad_targets = None if grad_logp is None else (grad_logp.float() * scale).reshape(-1, 1)
        grad_ent = None if grad_entropy is None else (grad_entropy.float() * scale).flatten()
        targets = None if grad_targets is None else index.reshape(-1, 1)
        row_grad = RowGrad(lse, None if grad_ent is None else ent, grad_ent, targets, grad_targets)
        return _blockwise_grad(ctx.ops, logits, scale, row_grad), None, None, None

"""Packed forwards of on-policy RL batches (GRPO, RLOO and every user of `completion_logps`).

An `OnlineBatch` holds left-padded prompts and right-padded completions, and GRPO repeats each prompt
`num_generations` times. The packed forward strips the padding and concatenates the batch into one row: the rows
sharing a prompt form one `PromptGroup`, whose prompt (all but its last token) is computed once, followed by one
segment per completion, `[prompt[-1], completion[:-1]]`, that attends to that prompt span and causally to itself
(`llm_trainer.models.packed_attention`). Its targets are the completion tokens, so every completion token is scored
from the same context as in the padded layout, and the gradients of all completions flow into the shared prompt
positions. A row with a prompt of its own is one plain segment, `[prompt, completion[:-1]]`.

`TokenBudget` is the token-budget micro-batcher: a micro-batch whose packed tokens exceed `max_tokens_per_batch` is
forwarded and backpropagated in chunks of whole groups, so peak activation memory follows the budget, with the loss
and gradients of the unsplit micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from ..models import packed_attention
from ..models.packed_attention import PackedLayout, Segment

if TYPE_CHECKING:
    from ..generation.loop import OnlineBatch

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class PromptGroup:
    """Batch rows with the same prompt (each with at least one completion token), packed together."""

    rows: tuple[int, ...]
    prompt_length: int
    completion_lengths: tuple[int, ...]

    @property
    def shared(self) -> bool:
        """Whether the prompt is computed once for all completions (several completions, a prompt of 2+ tokens)."""
        return len(self.rows) > 1 and self.prompt_length > 1

    @property
    def num_tokens(self) -> int:
        """Tokens of the group in the packed row."""
        if self.shared:
            return self.prompt_length - 1 + sum(self.completion_lengths)
        return sum(self.prompt_length - 1 + length for length in self.completion_lengths)


def prompt_groups(batch: OnlineBatch, share_prompts: bool = True) -> list[PromptGroup] | None:
    """The rows of `batch` grouped by prompt (every row alone without `share_prompts`), in order of first
    appearance; rows without completion tokens (e.g. masked truncated completions) are left out: their log-probs
    are 0. None when the batch is not left-padded prompts and right-padded completions (a mask with holes, or a
    completion without prompt), which only the padded layout reproduces."""
    prompt_mask, completion_mask = batch.prompt_mask.bool().cpu(), batch.completion_mask.bool().cpu()
    prompt_lengths, completion_lengths = prompt_mask.sum(1), completion_mask.sum(1)
    prompt_width, completion_width = prompt_mask.size(1), completion_mask.size(1)
    left_padded = torch.arange(prompt_width) >= (prompt_width - prompt_lengths)[:, None]
    right_padded = torch.arange(completion_width) < completion_lengths[:, None]
    if not (torch.equal(prompt_mask, left_padded) and torch.equal(completion_mask, right_padded)):
        return None
    if ((prompt_lengths == 0) & (completion_lengths > 0)).any():
        return None
    prompt_lengths, completion_lengths = prompt_lengths.tolist(), completion_lengths.tolist()
    prompts = batch.prompt_ids.cpu().tolist() if share_prompts else None
    by_prompt: dict[Any, list[int]] = {}
    for row, length in enumerate(completion_lengths):
        if length == 0:
            continue
        key = tuple(prompts[row][prompt_width - prompt_lengths[row] :]) if prompts is not None else row
        by_prompt.setdefault(key, []).append(row)
    return [
        PromptGroup(tuple(rows), prompt_lengths[rows[0]], tuple(completion_lengths[row] for row in rows))
        for rows in by_prompt.values()
    ]


def split_groups(
    groups: list[PromptGroup], max_tokens: int | None = None, max_rows: int | None = None
) -> list[list[PromptGroup]]:
    """Consecutive chunks of whole groups, each within `max_tokens` packed tokens and `max_rows` rows (None: no
    limit); a group over a limit is a chunk of its own."""
    chunks: list[list[PromptGroup]] = []
    tokens = rows = 0
    for group in groups:
        over_tokens = max_tokens is not None and tokens + group.num_tokens > max_tokens
        over_rows = max_rows is not None and rows + len(group.rows) > max_rows
        if not chunks or over_tokens or over_rows:
            chunks.append([])
            tokens = rows = 0
        chunks[-1].append(group)
        tokens, rows = tokens + group.num_tokens, rows + len(group.rows)
    return chunks


@dataclass(frozen=True)
class PackedRows:
    """Groups of a batch packed into one row: what the model takes, and where its outputs go back."""

    layout: PackedLayout
    input_ids: torch.Tensor
    """`[1, total]` tokens."""
    targets: torch.Tensor
    """`[1, total]` next-token labels (pre-shifted), -100 where nothing is scored."""
    source: torch.Tensor
    """Packed positions of the scored tokens."""
    destination: torch.Tensor
    """Their flat indices in the `[B, C]` completion layout."""
    shape: tuple[int, int]

    @classmethod
    def build(cls, batch: OnlineBatch, groups: list[PromptGroup]) -> PackedRows:
        """Pack `groups` of `batch` (see the module docstring)."""
        prompt_width, completion_width = batch.prompt_ids.size(1), batch.completion_ids.size(1)
        width = prompt_width + completion_width
        tokens: list[int] = []  # flat indices into the padded [B, P + C] input ids
        targets: list[int] = []  # the same for the labels, -1 for none
        segments: list[Segment] = []
        source: list[int] = []
        destination: list[int] = []
        for group in groups:
            length = group.prompt_length
            if group.shared:
                prompt_start = group.rows[0] * width + prompt_width - length
                prefix = (len(tokens), len(tokens) + length - 1)
                segments.append(Segment(*prefix))
                tokens.extend(range(prompt_start, prompt_start + length - 1))
                targets.extend([-1] * (length - 1))
                for row, n in zip(group.rows, group.completion_lengths):
                    start, completion_start = len(tokens), row * width + prompt_width
                    segments.append(Segment(start, start + n, *prefix))
                    tokens.append(prompt_start + length - 1)
                    tokens.extend(range(completion_start, completion_start + n - 1))
                    targets.extend(range(completion_start, completion_start + n))
                    source.extend(range(start, start + n))
                    destination.extend(range(row * completion_width, row * completion_width + n))
                continue
            for row, n in zip(group.rows, group.completion_lengths):
                start, completion_start = len(tokens), row * width + prompt_width
                segments.append(Segment(start, start + length + n - 1))
                tokens.extend(range(completion_start - length, completion_start + n - 1))
                targets.extend([-1] * (length - 1))
                targets.extend(range(completion_start, completion_start + n))
                source.extend(range(start + length - 1, start + length - 1 + n))
                destination.extend(range(row * completion_width, row * completion_width + n))
        device = batch.prompt_ids.device
        flat = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).reshape(-1)
        target_index = torch.tensor(targets, dtype=torch.long, device=device)
        labels = flat[target_index.clamp(min=0)].masked_fill(target_index < 0, -100)
        index = torch.tensor(tokens, dtype=torch.long, device=device)
        return cls(
            layout=PackedLayout(tuple(segments)),
            input_ids=flat[index].unsqueeze(0),
            targets=labels.unsqueeze(0),
            source=torch.tensor(source, dtype=torch.long, device=device),
            destination=torch.tensor(destination, dtype=torch.long, device=device),
            shape=(batch.completion_ids.size(0), completion_width),
        )

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token `values` `[1, total]` of the packed row → `[B, C]`, 0 where no completion token is scored
        (gradients flow back to the scored positions)."""
        rows, columns = self.shape
        out = values.new_zeros(rows * columns)
        return out.index_put((self.destination,), values[0, self.source]).view(rows, columns)

    def forward(self, model: torch.nn.Module, autocast: Callable[[], Any] = contextlib.nullcontext) -> Any:
        """`model`'s token log-prob output on the packed row."""
        kwargs = packed_attention.forward_kwargs(self.layout, self.input_ids.device)
        with autocast():
            return model(input_ids=self.input_ids, shift_labels=self.targets, token_logprobs=True, **kwargs)


def use_packed(model: torch.nn.Module, setting: bool | None, where: str = "packed_forward") -> bool:
    """Whether `completion_logps` runs `model` packed, as `packed_forward` (`setting`) says; see
    `packed_attention.prepare`, which also installs the packed attention the first time."""
    return packed_attention.prepare((model,), setting, where)


def check_trainer(trainer: Any) -> None:
    """An on-policy trainer's set-up: its policy runs packed as `packed_forward` says (a clear error now when it is
    True and the model cannot; the packed attention installed before the model is wrapped), and a
    `max_tokens_per_batch` is refused under DeepSpeed, whose `backward` also steps the optimizer at accumulation
    boundaries (a budget backpropagates each micro-batch in several chunks)."""
    from accelerate.utils import DistributedType

    args = trainer.args
    use_packed(trainer.model, getattr(args, "packed_forward", None), f"{type(args).__name__}.packed_forward")
    max_tokens = getattr(args, "max_tokens_per_batch", None)
    if max_tokens is not None and trainer.accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            f"max_tokens_per_batch={max_tokens} backpropagates each micro-batch in several chunks, which DeepSpeed's "
            "engine does not allow: unset it under DeepSpeed and bound memory with `per_device_train_batch_size`."
        )


def packed_completion_logps(
    model: torch.nn.Module,
    batch: OnlineBatch,
    groups: list[PromptGroup],
    batch_size: int | None = None,
    entropy: bool = False,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`completion_logps` on the packed layout, in chunks of whole groups of at most `batch_size` rows."""
    rows, columns = batch.completion_ids.shape
    logps = torch.zeros(rows, columns, device=batch.completion_ids.device)
    entropies = torch.zeros_like(logps) if entropy else None
    aux_losses = []
    for chunk in split_groups(groups, max_rows=batch_size):
        packed = PackedRows.build(batch, chunk)
        out = packed.forward(model, autocast)
        logps = logps + packed.scatter(out.log_probs)
        if entropy:
            entropies = entropies + packed.scatter(out.entropy)
        if out.aux_loss is not None:
            aux_losses.append(out.aux_loss)
    return logps, entropies, torch.stack(aux_losses).mean() if aux_losses else None


# ----------------------------------------------------------------------------------------------- token budget
Objective = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
"""`(per_token_logps [B, C], entropies [B, C] or None, aux_loss or None) -> scalar loss`, without side effects, and
a sum of per-row terms (its normalizers may depend on masks, not on other rows' values): GRPO's and RLOO's losses."""


@dataclass
class PolicyForward:
    """The training forward of a micro-batch, and its loss."""

    per_token_logps: torch.Tensor
    entropies: torch.Tensor | None
    aux_loss: torch.Tensor | None
    loss: torch.Tensor
    """The micro-batch's loss; its backward adds the gradients not yet accumulated (all of them when unsplit)."""


class TokenBudget:
    """`max_tokens_per_batch`: forward and backpropagate a micro-batch in chunks of at most `max_tokens` tokens.

    Chunks are whole prompt groups (a group over the budget is a chunk of its own, with a warning once; nothing is
    dropped), counted as packed tokens, or as padded rows × width when the model runs padded. Each chunk except the
    last is backpropagated at once (`backward`, outside gradient synchronisation: `no_sync`) through the objective
    evaluated on the full `[B, C]` log-probs with the chunk's rows in place, so its normalizers are those of the
    whole micro-batch; the last chunk's gradient comes with the returned loss, whose value is the objective of the
    whole micro-batch. This is exact for objectives that sum per-row terms (GRPO's and RLOO's); what couples rows
    (GRPO's `top_entropy_quantile` mask) goes through `prepare`, which sees every row's entropies first (at the
    cost of one more forward, without gradient, when the micro-batch is split).

    Args:
        max_tokens: the budget; None forwards the micro-batch whole.
        packed_forward: the `packed_forward` setting (see `use_packed`).
        backward: backpropagates a chunk's loss as the trainer would the micro-batch's (`accelerator.backward`, with
            the division for gradient accumulation the trainer applies to `compute_loss`'s result).
        no_sync: a context without gradient synchronisation across processes (`accelerator.no_sync(model)`).
    """

    def __init__(
        self,
        max_tokens: int | None,
        packed_forward: bool | None,
        backward: Callable[[torch.Tensor], None],
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens_per_batch must be a positive token count or None, got {max_tokens}.")
        self.max_tokens, self.packed_forward = max_tokens, packed_forward
        self.backward, self.no_sync = backward, no_sync

    def run(
        self,
        model: torch.nn.Module,
        batch: OnlineBatch,
        objective: Objective,
        *,
        entropy: bool = False,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        prepare: Callable[[torch.Tensor], None] | None = None,
    ) -> PolicyForward:
        """The micro-batch's log-probs (detached when split), entropies, MoE aux loss and loss. `prepare(entropies)`,
        when given, is called with every row's detached entropies before the objective is evaluated."""
        from ..generation.loop import completion_logps

        chunks = self._chunks(model, batch)
        if len(chunks) <= 1:
            logps, entropies, aux = completion_logps(
                model, batch, entropy=entropy, autocast=autocast, packed_forward=self.packed_forward
            )
            if prepare is not None:
                prepare(entropies.detach())
            return PolicyForward(logps, entropies, aux, objective(logps, entropies, aux))
        if prepare is not None:  # the rows' entropies, before any chunk's objective
            with torch.no_grad():
                prepare(self._forward_chunks(model, batch, chunks, True, autocast)[1])
        return self._run_chunks(model, batch, chunks, objective, entropy, autocast)

    def _chunks(self, model: torch.nn.Module, batch: OnlineBatch) -> list[torch.Tensor]:
        """Row indices of each chunk."""
        if self.max_tokens is None:
            return []
        groups = prompt_groups(batch) if use_packed(model, self.packed_forward) else None
        if groups is None:  # padded: one group per row, costing the padded width
            width = batch.prompt_ids.size(1) + batch.completion_ids.size(1)
            rows = batch.completion_ids.size(0)
            groups = [PromptGroup((row,), width, (1,)) for row in range(rows)]
        else:
            empty = sorted(set(range(batch.completion_ids.size(0))) - {row for g in groups for row in g.rows})
            if empty:  # rows without completion tokens ride along with the first chunk (their log-probs are 0)
                groups = [PromptGroup(tuple(empty), 1, (0,) * len(empty)), *groups]
        chunks = split_groups(groups, max_tokens=self.max_tokens)
        if any(sum(g.num_tokens for g in chunk) > self.max_tokens for chunk in chunks):
            logger.warning_once(
                f"A prompt group (or row) holds more than max_tokens_per_batch={self.max_tokens} tokens: it is "
                "forwarded whole, as a chunk of its own (this warning is shown once)."
            )
        device = batch.completion_ids.device
        return [torch.tensor([row for g in chunk for row in g.rows], device=device) for chunk in chunks]

    def _forward_chunks(
        self,
        model: torch.nn.Module,
        batch: OnlineBatch,
        chunks: list[torch.Tensor],
        entropy: bool,
        autocast: Callable[[], Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's log-probs and entropies `[B, C]`, chunk by chunk."""
        from ..generation.loop import completion_logps

        logps = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        entropies = torch.zeros_like(logps)
        for rows in chunks:
            part_logps, part_entropies, _ = completion_logps(
                model, batch.select(rows), entropy=entropy, autocast=autocast, packed_forward=self.packed_forward
            )
            logps[rows] = part_logps.float()
            if part_entropies is not None:
                entropies[rows] = part_entropies.float()
        return logps, entropies

    def _run_chunks(
        self,
        model: torch.nn.Module,
        batch: OnlineBatch,
        chunks: list[torch.Tensor],
        objective: Objective,
        entropy: bool,
        autocast: Callable[[], Any],
    ) -> PolicyForward:
        from ..generation.loop import completion_logps

        shape, device = batch.completion_ids.shape, batch.completion_ids.device
        # What the other rows hold while one chunk's objective is taken: any finite value (their terms carry no
        # gradient and the value is not used); the sampler's log-probs keep the importance ratios at 1.
        filler = batch.old_per_token_logps.detach().float() if batch.old_per_token_logps is not None else None
        filler = torch.zeros(shape, device=device) if filler is None else torch.nan_to_num(filler, nan=0.0)
        logps, entropies = torch.zeros(shape, device=device), torch.zeros(shape, device=device) if entropy else None
        aux_losses: list[torch.Tensor] = []
        training = torch.is_grad_enabled()
        last = None
        for index, rows in enumerate(chunks):
            final = index == len(chunks) - 1
            with self.no_sync() if training and not final else contextlib.nullcontext():
                part_logps, part_entropies, aux = completion_logps(
                    model, batch.select(rows), entropy=entropy, autocast=autocast, packed_forward=self.packed_forward
                )
                logps[rows] = part_logps.detach().float()
                if entropies is not None:
                    entropies[rows] = part_entropies.detach().float()
                if aux is not None:
                    aux_losses.append(aux.detach())
                if not training:
                    continue
                chunk_logps = filler.index_put((rows,), part_logps.float())
                chunk_entropies = None
                if entropies is not None:
                    chunk_entropies = torch.zeros(shape, device=device).index_put((rows,), part_entropies.float())
                chunk_aux = aux / len(chunks) if aux is not None else None
                loss = objective(chunk_logps, chunk_entropies, chunk_aux)
                if final:
                    last = loss
                else:
                    self.backward(loss)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        with torch.no_grad():
            total = objective(logps, entropies, aux_loss)
        loss = total if last is None else total + (last - last.detach())
        return PolicyForward(logps, entropies, aux_loss, loss)


def trainer_token_budget(trainer: Any, model: torch.nn.Module) -> TokenBudget:
    """The `TokenBudget` of an on-policy trainer's config (`max_tokens_per_batch`, `packed_forward`; see
    `check_trainer`): chunks are backpropagated as `Trainer.training_step` backpropagates `compute_loss`'s result
    (divided by the accumulation steps unless the trainer's loss already is), outside DDP's gradient
    synchronisation."""
    args, accelerator = trainer.args, trainer.accelerator

    def backward(loss: torch.Tensor) -> None:
        if not trainer.loss_is_scaled_for_ga:
            loss = loss / trainer.current_gradient_accumulation_steps
        accelerator.backward(loss)

    max_tokens, packed = getattr(args, "max_tokens_per_batch", None), getattr(args, "packed_forward", None)
    return TokenBudget(max_tokens, packed, backward, lambda: accelerator.no_sync(model))

"""Batch collators and the padding helper they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin


def pad(
    tensors: list[torch.Tensor],
    padding_value: int = 0,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> torch.Tensor:
    """Stack tensors of different lengths, padding every dimension to the largest size (TRL's `pad`).

    >>> pad([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    tensor([[1, 2, 3],
            [4, 5, 0]])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    if pad_to_multiple_of:
        shape[0] = -(-shape[0] // pad_to_multiple_of) * pad_to_multiple_of
    out = tensors[0].new_full((len(tensors), *shape), padding_value)
    for row, t in zip(out, tensors):
        start = shape[0] - t.shape[0] if padding_side == "left" else 0
        row[(slice(start, start + t.shape[0]), *(slice(0, s) for s in t.shape[1:]))] = t
    return out


def position_ids_from_lengths(seq_lengths: list[int]) -> torch.Tensor:
    """Positions restarting at 0 for each packed sequence: `[3, 2]` -> `[0, 1, 2, 0, 1]`."""
    lengths = torch.as_tensor(seq_lengths)
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum())) - starts


@dataclass
class DataCollatorForLanguageModeling(DataCollatorMixin):
    """Collate tokenized examples for causal language modeling (TRL's collator of the same name).

    Each example has `input_ids`, optionally `labels` (-100 where the loss is off; defaults to the input ids) and
    `seq_lengths` (lengths of the sequences packed into the row). Returns `input_ids`, `labels` and
    `attention_mask`, right-padded. With `padding_free=True` the batch is flattened into one row and
    `position_ids` (restarting at each sequence), `cu_seq_lens_q/k`, `max_length_q/k` and `seq_idx` replace the
    attention mask, so no token attends across a sequence boundary.

    >>> DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    {'input_ids': tensor([[1, 2, 3], [4, 5, 0]]), 'labels': tensor([[1, 2, 3], [4, 5, -100]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0]])}
    """

    pad_token_id: int
    padding_free: bool = False
    return_position_ids: bool = False
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [torch.as_tensor(ex["input_ids"]) for ex in examples]
        labels = [torch.as_tensor(ex["labels"] if "labels" in ex else ex["input_ids"]) for ex in examples]
        if self.padding_free or self.return_position_ids:
            position_ids = [
                position_ids_from_lengths(ex["seq_lengths"]) if "seq_lengths" in ex else torch.arange(len(ids))
                for ex, ids in zip(examples, input_ids)
            ]
        multiple = self.pad_to_multiple_of
        if self.padding_free:
            input_ids, labels, position_ids = [torch.cat(input_ids)], [torch.cat(labels)], [torch.cat(position_ids)]
        out = {
            "input_ids": pad(input_ids, self.pad_token_id, pad_to_multiple_of=multiple),
            "labels": pad(labels, -100, pad_to_multiple_of=multiple),
        }
        if not self.padding_free:
            if self.return_position_ids:
                out["position_ids"] = pad(position_ids, 0, pad_to_multiple_of=multiple)
            out["attention_mask"] = pad([torch.ones_like(ids) for ids in input_ids], 0, pad_to_multiple_of=multiple)
            return out
        positions = pad(position_ids, 0, pad_to_multiple_of=multiple)
        out["position_ids"] = positions
        out["labels"][positions == 0] = -100  # a sequence's first token has no prediction from the one before
        starts = (positions[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([positions.size(1)])]).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
        out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
        out["seq_idx"] = torch.repeat_interleave(
            torch.arange(len(cu_seq_lens) - 1, dtype=torch.int32), cu_seq_lens.diff()
        )[None]
        return out


def truncate(ids: list, max_length: int | None, truncation_mode: str = "keep_start") -> list:
    """The first (`keep_start`) or last (`keep_end`) `max_length` items of `ids`; all of them when None."""
    if max_length is None:
        return ids
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"`truncation_mode` must be 'keep_start' or 'keep_end', got {truncation_mode!r}.")
    return ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:]


@dataclass
class DataCollatorForPreference(DataCollatorMixin):
    """Collate `prompt_ids` / `chosen_ids` / `rejected_ids` examples into one batch of 2B rows, chosen first
    (TRL's collator of the same name).

    Returns `input_ids`, `attention_mask` and `completion_mask` (1 on completion tokens), right-padded, each sequence
    truncated to `max_length`; `ref_chosen_logps` / `ref_rejected_logps` pass through when precomputed.

    >>> DataCollatorForPreference(pad_token_id=0)(
    ...     [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    ...      {"prompt_ids": [7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]}])["completion_mask"]
    tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]])
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt, completion = ex["prompt_ids"], ex[key]
                sequences.append(torch.as_tensor(truncate(prompt + completion, self.max_length, self.truncation_mode)))
                mask = [0] * len(prompt) + [1] * len(completion)
                masks.append(torch.as_tensor(truncate(mask, self.max_length, self.truncation_mode)))
        multiple = self.pad_to_multiple_of
        out = {
            "input_ids": pad(sequences, self.pad_token_id, pad_to_multiple_of=multiple),
            "attention_mask": pad([torch.ones_like(s) for s in sequences], 0, pad_to_multiple_of=multiple),
            "completion_mask": pad(masks, 0, pad_to_multiple_of=multiple),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        return out

"""Preference pairs as a reward model reads them (TRL 1.16's `RewardTrainer._prepare_dataset` and its collator).

A reward model scores whole sequences, so no prompt is split off: with an explicit `prompt` it is prepended to both
completions, with an implicit one the `chosen` / `rejected` texts are used whole. Plain-text sequences get eos
appended, conversations go through the chat template, and pairs where either side is longer than `max_length` are
dropped (not truncated: a cut-off sequence would be scored on text it does not end with).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers.data.data_collator import DataCollatorMixin

from .collators import pad
from .formats import get_dataset_column_names, is_conversational
from .preference_dataset import _add_eos, check_preference_dataset, filter_rows
from .tokenization import template_kwargs, tokenize
from .validation import check_numbers, check_text_columns, warn_identical_pairs
from .vision import refuse_image_columns

LEGACY_COLUMNS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}


def prepare_reward_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Add `chosen_ids` / `rejected_ids` (prompt included) and drop pairs with a side longer than `max_length`.

    Already tokenized datasets (`chosen_ids`, `rejected_ids`) are only filtered; the legacy `chosen_input_ids` /
    `rejected_input_ids` columns are renamed with a `FutureWarning`, as TRL does. An optional `margin` column is kept.
    """
    refuse_image_columns(dataset, "RewardTrainer", name)
    columns = get_dataset_column_names(dataset)
    if set(LEGACY_COLUMNS) <= set(columns) and not {"chosen_ids", "rejected_ids"} <= set(columns):
        warnings.warn(
            "The `chosen_input_ids` / `rejected_input_ids` columns are deprecated and will not be supported in v1; "
            "name them `chosen_ids` / `rejected_ids`.",
            FutureWarning,
            stacklevel=3,
        )
        dataset = dataset.rename_columns(LEGACY_COLUMNS)
    first = check_preference_dataset(dataset, name)
    check_numbers(dataset, "margin", name)
    is_map_style = isinstance(dataset, Dataset)

    def map_kwargs(text: str) -> dict[str, Any]:  # `IterableDataset.map` takes neither `num_proc` nor `desc`
        return {"num_proc": num_proc, "desc": f"{text} {name} dataset"} if is_map_style else {}

    if "chosen_ids" not in first:
        check_text_columns(dataset, ["prompt", "chosen", "rejected"], name)
        warn_identical_pairs(dataset, name)
        if not is_conversational(first):
            dataset = dataset.map(_add_eos, fn_kwargs={"eos": tokenizer.eos_token}, **map_kwargs("Adding EOS to"))
        dataset = dataset.map(_tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, **map_kwargs("Tokenizing"))
    if max_length is not None:
        reason = f"the chosen or rejected sequence is longer than max_length={max_length}"
        fix = "Raise `max_length` (pairs are dropped, not truncated, so that each sequence is scored whole)."
        kwargs = map_kwargs(f"Filtering >{max_length} tokens from")
        dataset = filter_rows(dataset, _fits, name, reason, fix, fn_kwargs={"max_length": max_length}, **kwargs)
    return dataset


def _tokenize_pair(example: dict, tokenizer: Any) -> dict:
    prompt = example.get("prompt")
    kwargs = template_kwargs(example)
    out = {}
    for key in ("chosen", "rejected"):
        sequence = example[key] if prompt is None else prompt + example[key]
        out[f"{key}_ids"] = tokenize(tokenizer, sequence, **kwargs)["input_ids"]
    return out


def _fits(example: dict, max_length: int) -> bool:
    return len(example["chosen_ids"]) <= max_length and len(example["rejected_ids"]) <= max_length


@dataclass
class DataCollatorForReward(DataCollatorMixin):
    """Collate `chosen_ids` / `rejected_ids` pairs into 2B right-padded rows, the chosen half first (TRL's
    `trl.trainer.reward_trainer.DataCollatorForPreference`).

    Returns `input_ids` and `attention_mask`, plus `margin` (float, one per pair) when the examples carry one.

    >>> DataCollatorForReward(pad_token_id=0)(
    ...     [{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
    ...      {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0}])
    {'input_ids': tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]),
     'margin': tensor([0.5000, 0.0000])}
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [torch.as_tensor(ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
        multiple = self.pad_to_multiple_of
        out = {
            "input_ids": pad(sequences, self.pad_token_id, pad_to_multiple_of=multiple),
            "attention_mask": pad([torch.ones_like(s) for s in sequences], 0, pad_to_multiple_of=multiple),
        }
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        return out

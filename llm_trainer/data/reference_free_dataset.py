"""Preference pairs as ORPO and CPO read them (TRL 1.16's `trl.experimental` `tokenize_row`).

On top of the shared preparation (`prepare_preference_dataset`: prompt extraction, chat template, tokenization),
these trainers differ from DPO in three ways, kept here for parity with TRL:

- the prompt starts with the tokenizer's bos token when it has one and the prompt does not already;
- each completion ends with the eos token id, conversations included (after the template's closing tokens);
- over-long pairs are not dropped: the completion is cut to `max_length - len(prompt)` tokens (possibly to nothing),
  and the prompt is never truncated.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from datasets import Dataset, IterableDataset

from .preference_dataset import prepare_preference_dataset

logger = logging.getLogger(__name__)


def prepare_reference_free_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Add `prompt_ids`, `chosen_ids` and `rejected_ids`, with bos / eos and completion truncation as TRL's ORPO and
    CPO trainers do. Already tokenized datasets keep their tokens and are only truncated."""
    map_kwargs: dict[str, Any] = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    raw = "chosen_ids" not in next(iter(dataset), {})
    dataset = prepare_preference_dataset(dataset, tokenizer, max_length=None, num_proc=num_proc, name=name)  # checks
    if raw:
        dataset = dataset.map(
            _add_special_tokens,
            fn_kwargs={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
            **map_kwargs,
        )
    if max_length is not None:
        dataset = dataset.map(_truncate_completions, fn_kwargs={"max_length": max_length}, **map_kwargs)
    return dataset


def _add_special_tokens(example: dict, bos: int | None, eos: int | None) -> dict:
    prompt_ids = example["prompt_ids"]
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        example["prompt_ids"] = [bos, *prompt_ids]
    for key in ("chosen_ids", "rejected_ids"):
        ids = example[key]
        if eos is not None and (not ids or ids[-1] != eos):
            example[key] = [*ids, eos]
    return example


def _truncate_completions(example: dict, max_length: int) -> dict:
    room = max(0, max_length - len(example["prompt_ids"]))
    for key in ("chosen_ids", "rejected_ids"):
        example[key] = example[key][:room]
    if room == 0:
        _warn_empty_completions(max_length)
    return example


@functools.cache
def _warn_empty_completions(max_length: int) -> None:
    logger.warning(
        "A prompt alone fills max_length=%d, so its completions are empty; raise `max_length` or drop long prompts.",
        max_length,
    )

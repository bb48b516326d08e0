"""Turn a preference dataset (explicit or implicit prompt, standard or conversational) into token ids.

Shared by DPO, ORPO and CPO (TRL's `DPOTrainer._prepare_dataset`): extract the shared prompt when there is none,
append eos to plain-text completions, tokenize into `prompt_ids`, `chosen_ids` and `rejected_ids`, and drop rows
whose prompt alone fills `max_length` (they would keep no completion token).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset

from .chat_template import extract_prompt
from .formats import is_conversational
from .tokenization import template_kwargs, tokenize_prompt_completions
from .validation import check_rows_kept, check_text_columns, warn_identical_pairs

PREFERENCE_COLUMNS = ("chosen", "rejected")


def first_row(dataset: Dataset | IterableDataset, name: str, what: str) -> dict[str, Any]:
    """The first row of `dataset`; a `ValueError` asking for at least one `what` when it is empty."""
    example = None if isinstance(dataset, Dataset) and len(dataset) == 0 else next(iter(dataset), None)
    if example is None:
        raise ValueError(f"The {name} dataset is empty: pass a dataset with at least one {what}.")
    return example


def filter_rows(dataset: Dataset | IterableDataset, keep: Any, name: str, reason: str, fix: str, **kwargs: Any):
    """`dataset.filter(keep, **kwargs)`, then `check_rows_kept`: a warning for dropped rows, an error for none left."""
    before = len(dataset) if isinstance(dataset, Dataset) else None
    dataset = dataset.filter(keep, **kwargs)
    check_rows_kept(before, dataset, name, reason, fix)
    return dataset


def prompt_fits(example: dict, max_length: int) -> bool:
    """Whether the prompt leaves room for a completion token within `max_length`."""
    return len(example["prompt_ids"]) < max_length


def check_preference_dataset(dataset: Dataset | IterableDataset, name: str = "train") -> dict[str, Any]:
    """Return the first row, or raise a `ValueError` naming what an empty or non-preference dataset lacks."""
    example = first_row(dataset, name, "preference pair")
    if "chosen_ids" in example and "rejected_ids" in example:
        return example
    missing = [column for column in PREFERENCE_COLUMNS if column not in example]
    if missing:
        raise ValueError(
            f"The {name} dataset has columns {sorted(example)} but a preference dataset needs 'chosen' and 'rejected' "
            f"(and optionally 'prompt'); missing: {missing}. Rename your columns, e.g. "
            "`dataset.rename_column('response_good', 'chosen')`."
        )
    return example


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Add `prompt_ids`, `chosen_ids` and `rejected_ids` to a preference dataset (already tokenized rows pass)."""
    first = check_preference_dataset(dataset, name)
    if "chosen_ids" in first:
        return dataset
    map_kwargs: dict[str, Any] = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}

    def desc(text: str) -> dict[str, Any]:
        return {**map_kwargs, "desc": f"{text} {name} dataset"} if isinstance(dataset, Dataset) else map_kwargs

    check_text_columns(dataset, ["prompt", *PREFERENCE_COLUMNS], name)
    warn_identical_pairs(dataset, name)
    if "prompt" not in first:
        dataset = dataset.map(extract_prompt, **desc("Extracting prompt from"))
    if not is_conversational(next(iter(dataset))):
        dataset = dataset.map(_add_eos, fn_kwargs={"eos": tokenizer.eos_token}, **desc("Adding EOS to"))
    dataset = dataset.map(_tokenize_pair, fn_kwargs={"tokenizer": tokenizer}, **desc("Tokenizing"))
    if max_length is not None and truncation_mode == "keep_start":
        reason = f"the prompt alone fills max_length={max_length}, leaving no room for the completions"
        fix = "Raise `max_length`, or shorten the prompts."
        kwargs = {"fn_kwargs": {"max_length": max_length}, **desc("Filtering")}
        dataset = filter_rows(dataset, prompt_fits, name, reason, fix, **kwargs)
    return dataset


def _add_eos(example: dict, eos: str) -> dict:
    for key in PREFERENCE_COLUMNS:
        if not example[key].endswith(eos):
            example[key] = example[key] + eos
    return example


def _tokenize_pair(example: dict, tokenizer: Any) -> dict:
    completions = {key: example[key] for key in PREFERENCE_COLUMNS}
    return tokenize_prompt_completions(tokenizer, example["prompt"], completions, template_kwargs(example))

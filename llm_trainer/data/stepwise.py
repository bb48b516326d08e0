"""Stepwise supervision data (`prompt`, `completions`, `labels`) as TRL 1.13's PRMTrainer tokenizes it.

Each reasoning step is followed by `step_separator`; the step's label (1 correct, 0 wrong) sits on the last token of
the step + separator, and every other token is -100, so a token-classification model learns to score each step
where it ends.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from datasets import Dataset, IterableDataset, features

from .formats import is_conversational
from .preference_dataset import first_row
from .validation import check_text_columns

STEPWISE_COLUMNS = ("prompt", "completions", "labels")
TOKENIZED_FEATURES = features.Features(
    {
        "input_ids": features.Sequence(features.Value("int64")),
        "labels": features.Sequence(features.Value("int64")),
    }
)


def check_stepwise_dataset(dataset: Dataset | IterableDataset, name: str = "train") -> dict[str, Any]:
    """Return the first row, or raise a `ValueError` naming what an empty or non-stepwise dataset lacks."""
    example = first_row(dataset, name, "stepwise example")
    if "input_ids" in example:
        return example
    missing = [column for column in STEPWISE_COLUMNS if column not in example]
    if missing:
        raise ValueError(
            f"The {name} dataset has columns {sorted(example)}, but stepwise supervision needs 'prompt', "
            "'completions' (the list of reasoning steps) and 'labels' (one bool per step); missing: "
            f"{missing}. Rename your columns, or pass pre-tokenized 'input_ids' and 'labels'."
        )
    check_text_columns(dataset, ["prompt"], name)
    if is_conversational({"prompt": example["prompt"]}):
        raise ValueError(
            f"The {name} dataset is conversational, but stepwise supervision takes plain-text prompts and steps. "
            "Render the prompt with `tokenizer.apply_chat_template(prompt, tokenize=False, "
            "add_generation_prompt=True)` first."
        )
    return example


def tokenize_stepwise(
    example: dict[str, Any],
    tokenizer: Any,
    step_separator: str = "\n",
    max_length: int | None = None,
    max_completion_length: int | None = None,
    train_on_last_step_only: bool = False,
    is_eval: bool = False,
) -> dict[str, list[int]]:
    """`input_ids` and per-token `labels` of one stepwise example (TRL 1.13's `PRMTrainer.tokenize_row`).

    The prompt (after the tokenizer's bos token, if it has one) gets -100 labels; each step is tokenized without
    special tokens and followed by the tokens of `step_separator`, with the step's label on the last of them.
    With `train_on_last_step_only` (training data only) every step but the last is -100. The completion is cut to
    `max_completion_length` tokens, then the whole sequence to `max_length`.

    >>> tokenize_stepwise({"prompt": "Q", "completions": ["a", "b"], "labels": [True, False]}, tokenizer)
    {'input_ids': [<Q>, <a>, <\\n>, <b>, <\\n>], 'labels': [-100, -100, 1, -100, 0]}
    """
    steps, step_labels = example["completions"], example["labels"]
    if len(steps) != len(step_labels) or not steps:
        raise ValueError(
            f"A stepwise example needs one label per step and at least one step, got {len(steps)} steps and "
            f"{len(step_labels)} labels (prompt {example['prompt']!r})."
        )
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    steps_ids = [tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids for step in steps]
    if train_on_last_step_only and not is_eval:
        values = [-100] * (len(step_labels) - 1) + [int(step_labels[-1])]
    else:
        values = [int(label) for label in step_labels]
    completion_ids = list(chain.from_iterable(steps_ids))
    labels = list(chain.from_iterable([-100] * (len(ids) - 1) + [v] for ids, v in zip(steps_ids, values)))
    if max_completion_length is not None:
        completion_ids, labels = completion_ids[:max_completion_length], labels[:max_completion_length]
    input_ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + labels
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def prepare_stepwise_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    *,
    num_proc: int | None = None,
    name: str = "train",
    **options: Any,
) -> Dataset | IterableDataset:
    """Replace a stepwise dataset's columns by `input_ids` and `labels`, tokenized by `tokenize_stepwise` with
    `options` (`step_separator`, `max_length`, ...); already tokenized datasets pass."""
    first = check_stepwise_dataset(dataset, name)
    if "input_ids" in first:
        return dataset
    map_kwargs: dict[str, Any] = (
        {"num_proc": num_proc, "desc": f"Tokenizing {name} dataset"} if isinstance(dataset, Dataset) else {}
    )
    return dataset.map(
        tokenize_stepwise,
        fn_kwargs={"tokenizer": tokenizer, **options},
        remove_columns=list(first),
        features=TOKENIZED_FEATURES,  # keeps `labels` int64 rather than the source column's bool
        **map_kwargs,
    )

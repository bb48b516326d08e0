"""Turn paired preference data (`chosen` / `rejected`) into unpaired, labelled completions."""

from __future__ import annotations

from typing import Any

from .formats import AnyDataset, get_dataset_column_names


def unpair_preference_dataset(dataset: AnyDataset, **map_kwargs: Any) -> AnyDataset:
    """Unpair a preference dataset into `prompt`, `completion` and `label` rows.

    Each batch of `map` yields its chosen completions (`label=True`) followed by its rejected ones (`label=False`);
    `prompt` and any other columns are repeated for both. `map_kwargs` go to `dataset.map` (`num_proc`, `batch_size`,
    `desc`, ...).

    Example:
    ```python
    >>> dataset = Dataset.from_dict(
    ...     {"prompt": ["The sky is", "The sun is"], "chosen": [" blue.", " hot."], "rejected": [" green.", " cold."]}
    ... )
    >>> unpair_preference_dataset(dataset)[:]
    {'prompt': ['The sky is', 'The sun is', 'The sky is', 'The sun is'],
     'completion': [' blue.', ' hot.', ' green.', ' cold.'],
     'label': [True, True, False, False]}
    ```
    """
    column_names = get_dataset_column_names(dataset)
    if not _is_paired(column_names):
        raise ValueError(
            f"unpair_preference_dataset needs 'chosen' and 'rejected' columns, but the dataset has {column_names}. "
            "Rename the preferred and dispreferred completion columns to 'chosen' and 'rejected'."
        )
    return dataset.map(_unpair_batch, batched=True, remove_columns=column_names, **map_kwargs)


def _is_paired(column_names: list[str]) -> bool:
    return "chosen" in column_names and "rejected" in column_names


def _unpair_batch(batch: dict[str, list]) -> dict[str, list]:
    size = len(batch["chosen"])
    unpaired = {key: values + values for key, values in batch.items() if key not in ("chosen", "rejected")}
    unpaired["completion"] = batch["chosen"] + batch["rejected"]
    unpaired["label"] = [True] * size + [False] * size
    return unpaired


def maybe_unpair_preference_dataset(
    dataset: AnyDataset, num_proc: int | None = None, desc: str | None = None
) -> AnyDataset:
    """[`unpair_preference_dataset`] if `dataset` has `chosen` and `rejected` columns, otherwise `dataset` unchanged.

    `num_proc` and `desc` go to `dataset.map` when set (streaming datasets accept neither).
    """
    if not _is_paired(get_dataset_column_names(dataset)):
        return dataset
    map_kwargs = {key: value for key, value in {"num_proc": num_proc, "desc": desc}.items() if value is not None}
    return unpair_preference_dataset(dataset, **map_kwargs)

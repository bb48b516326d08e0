"""TRL's data helpers at TRL's import path (`trl.data_utils`); they live in `llm_trainer.data`."""

from typing import TypeVar

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from .data import (
    apply_chat_template,
    common_prefix_length,
    extract_prompt,
    get_dataset_column_names,
    is_conversational,
    is_conversational_from_value,
    maybe_apply_chat_template,
    maybe_convert_to_chatml,
    maybe_extract_prompt,
    maybe_unpair_preference_dataset,
    pack_dataset,
    prepare_multimodal_messages,
    unpair_preference_dataset,
)

# The dataset types the helpers accept and return unchanged in kind (map-style, or streaming).
DatasetType = TypeVar("DatasetType", Dataset, DatasetDict)
IterableDatasetType = TypeVar("IterableDatasetType", IterableDataset, IterableDatasetDict)

__all__ = [
    "DatasetType",
    "IterableDatasetType",
    "apply_chat_template",
    "common_prefix_length",
    "extract_prompt",
    "get_dataset_column_names",
    "is_conversational",
    "is_conversational_from_value",
    "maybe_apply_chat_template",
    "maybe_convert_to_chatml",
    "maybe_extract_prompt",
    "maybe_unpair_preference_dataset",
    "pack_dataset",
    "prepare_multimodal_messages",
    "unpair_preference_dataset",
]

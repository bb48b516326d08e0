"""TRL's data helpers at TRL's import path (`trl.data_utils`); they live in `llm_trainer.data`."""

from typing import TypeVar

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from .data import *  # noqa: F403 (every name `llm_trainer.data` lists)
from .data import __all__ as _DATA_NAMES

# The dataset types the helpers accept and return unchanged in kind (map-style, or streaming).
DatasetType = TypeVar("DatasetType", Dataset, DatasetDict)
IterableDatasetType = TypeVar("IterableDatasetType", IterableDataset, IterableDatasetDict)

__all__ = ["DatasetType", "IterableDatasetType", *_DATA_NAMES]

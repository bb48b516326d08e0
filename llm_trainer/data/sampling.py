"""Prompt order for online RL: each prompt repeated once per generation, each generation batch reused across steps.

`RepeatSampler` orders a map-style dataset's indices; `repeat_iterable_dataset` gives a streamed dataset, which has
no indices, the same order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sized
from typing import Any

import torch
from datasets import IterableDataset
from torch.utils.data import Sampler


class RepeatSampler(Sampler[int]):
    """Yield dataset indices so that a group of `mini_repeat_count` identical prompts is contiguous.

    The indices are (optionally) permuted with a generator seeded by `seed`, cut into chunks of `batch_size` prompts
    (a trailing partial chunk is dropped), and each chunk is yielded `repeat_count` times, every index repeated
    `mini_repeat_count` times in a row. With every process using the same seed, the groups of a generation batch are
    split consistently across processes. Same order as TRL's `RepeatSampler`.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        shuffle: bool = True,
        seed: int | None = None,
    ):
        self.data_source = data_source
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        else:
            order = list(range(self.num_samples))
        for start in range(0, self.num_samples - self.batch_size + 1, self.batch_size):
            chunk = order[start : start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def repeat_iterable_dataset(
    dataset: IterableDataset,
    mini_repeat_count: int,
    batch_size: int = 1,
    repeat_count: int = 1,
    seed: int | None = None,
) -> IterableDataset:
    """The records of `dataset` in the order `RepeatSampler` yields indices with the same arguments.

    The stream is read `batch_size` records at a time (a trailing partial chunk is dropped); each chunk is emitted
    `repeat_count` times, every record repeated `mini_repeat_count` times in a row, as independent deep copies. With
    `seed`, the stream is first shuffled through a buffer of 1000 records (`IterableDataset.shuffle`), the streaming
    stand-in for `RepeatSampler`'s full permutation; without it, the order is the stream's. The result stays chained
    to `dataset`, so `set_epoch` reaches the shuffle and every epoch is reshuffled. Same order as TRL's
    `repeat_iterable_dataset` applied to `dataset.shuffle(seed=seed)`.
    """
    if min(mini_repeat_count, batch_size, repeat_count) < 1:
        raise ValueError(
            f"`mini_repeat_count`, `batch_size` and `repeat_count` must be positive, got {mini_repeat_count}, "
            f"{batch_size} and {repeat_count}."
        )
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)

    def repeat_chunk(chunk: dict[str, list[Any]]) -> dict[str, list[Any]]:
        positions = [i for _ in range(repeat_count) for i in range(batch_size) for _ in range(mini_repeat_count)]
        return {column: [copy.deepcopy(values[i]) for i in positions] for column, values in chunk.items()}

    return dataset.map(
        repeat_chunk, batched=True, batch_size=batch_size, drop_last_batch=True, features=dataset.features
    )

"""Prompt order for online RL: `repeat_iterable_dataset` streams records in `RepeatSampler`'s order and in TRL's
`repeat_iterable_dataset` order (shuffled or not), reshuffles per epoch and yields independent repeats."""

from __future__ import annotations

import pytest
from datasets import Dataset

from llm_trainer.data.sampling import RepeatSampler, repeat_iterable_dataset

SHAPES = [
    {"mini_repeat_count": 2, "batch_size": 3, "repeat_count": 4},
    {"mini_repeat_count": 4, "batch_size": 1, "repeat_count": 1},
    {"mini_repeat_count": 1, "batch_size": 4, "repeat_count": 2},
    {"mini_repeat_count": 3, "batch_size": 7, "repeat_count": 1},
    {"mini_repeat_count": 2, "batch_size": 8, "repeat_count": 1},  # larger than the dataset: nothing is yielded
]


def _data(n: int = 7) -> Dataset:
    return Dataset.from_dict(
        {"x": list(range(n)), "prompt": [[{"role": "user", "content": str(i)}] for i in range(n)]}
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_unshuffled_order_is_the_repeat_samplers(shape):
    data = _data()
    sampler = RepeatSampler(data, shuffle=False, **shape)
    streamed = [row["x"] for row in repeat_iterable_dataset(data.to_iterable_dataset(), **shape)]
    assert streamed == list(sampler)
    assert len(streamed) == len(sampler)


@pytest.mark.parametrize("seed", [None, 0, 42])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_order_matches_trl(shape, seed):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    stream = _data(23).to_iterable_dataset(num_shards=3)
    upstream = stream.shuffle(seed=seed) if seed is not None else stream
    theirs = list(trl_utils.repeat_iterable_dataset(upstream, **shape))
    ours = list(repeat_iterable_dataset(stream, **shape, seed=seed))
    assert ours == theirs
    if seed is not None:
        assert [row["x"] for row in ours] != [row["x"] for row in repeat_iterable_dataset(stream, **shape)]


def test_each_epoch_is_reshuffled_and_keeps_the_columns():
    repeated = repeat_iterable_dataset(_data(20).to_iterable_dataset(), 2, batch_size=4, seed=3)
    assert repeated.column_names == ["x", "prompt"]
    first = [row["x"] for row in repeated]
    assert first == [row["x"] for row in repeated]
    repeated.set_epoch(1)
    second = [row["x"] for row in repeated]
    assert second != first and sorted(second) == sorted(first)


def test_repeats_are_independent_copies():
    rows = list(repeat_iterable_dataset(_data().to_iterable_dataset(), 2, batch_size=2))
    rows[0]["prompt"][0]["content"] = "changed"
    assert rows[1]["prompt"][0]["content"] == "0"


def test_non_positive_counts_are_refused():
    with pytest.raises(ValueError, match="must be positive, got 0"):
        repeat_iterable_dataset(_data().to_iterable_dataset(), 0)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_repeat_sampler_yields_trls_order(shape, shuffle):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    data = _data()
    ours = RepeatSampler(data, shuffle=shuffle, seed=5, **shape)
    theirs = trl_utils.RepeatSampler(data, shuffle=shuffle, seed=5, **shape)
    assert len(ours) == len(theirs)
    for _ in range(2):  # the second epoch draws a new permutation from the same generator
        assert list(ours) == list(theirs)

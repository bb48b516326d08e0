"""Pack tokenized sequences into rows of at most `seq_length` tokens, on Arrow buffers.

Each `map` batch is packed on its own: the per-token columns are flattened once, the packed rows are described by
(start, length) fragments of the flat values, and a single gather per column assembles them. Only the bin choice
of Best Fit Decreasing is a Python loop, over one integer per sequence.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict, deque
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDatasetDict

from .formats import AnyDataset, get_dataset_column_names

PackingStrategy = Literal["bfd", "bfd_split", "wrapped"]
_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def pack_dataset(
    dataset: AnyDataset,
    seq_length: int,
    strategy: PackingStrategy = "bfd",
    map_kwargs: dict[str, Any] | None = None,
) -> AnyDataset:
    """Pack the sequences of `dataset` into rows of at most `seq_length` tokens.

    Every column must hold one list per row, all columns the same length per row (`input_ids`, `attention_mask`,
    `labels`, ...). Strategies:

    - `"bfd"` (Best Fit Decreasing): whole sequences are packed, longest first, each into the fullest row it fits;
      sequences longer than `seq_length` are truncated. Suits SFT, where a conversation must stay whole.
    - `"bfd_split"`: as `"bfd"`, but overlong sequences are split into `seq_length` chunks, so no token is lost.
    - `"wrapped"`: sequences are concatenated and cut every `seq_length` tokens, ignoring their boundaries.

    The BFD strategies add a `seq_lengths` column, the lengths of the sequences in each row (from which position ids
    restart per sequence), and drop empty sequences. Packing happens within each `map` batch; `map_kwargs` go to
    `dataset.map` (`batch_size`, `num_proc`, ...). The dataset's format is kept.

    Example:
    ```python
    >>> dataset = Dataset.from_dict(
    ...     {
    ...         "input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
    ...         "attention_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]],
    ...     }
    ... )
    >>> pack_dataset(dataset, seq_length=4, strategy="bfd")[:]
    {'input_ids': [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]],
     'attention_mask': [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0]],
     'seq_lengths': [[4], [3, 1], [2]]}
    >>> pack_dataset(dataset, seq_length=4, strategy="bfd_split")[:]
    {'input_ids': [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]],
     'attention_mask': [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1]],
     'seq_lengths': [[4], [3, 1], [2, 1]]}
    ```
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"Invalid packing strategy {strategy!r}, must be one of {_STRATEGIES}.")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer (tokens per packed row), got {seq_length!r}.")
    pack = _pack_wrapped if strategy == "wrapped" else _pack_bfd
    fn_kwargs = {"seq_length": int(seq_length)} | ({} if strategy == "wrapped" else {"split": strategy == "bfd_split"})
    dataset_format = _get_format(dataset)
    packed = dataset.with_format("arrow").map(pack, batched=True, fn_kwargs=fn_kwargs, **(map_kwargs or {}))
    columns = dataset_format.get("columns")
    if columns is not None and strategy != "wrapped" and "seq_lengths" in get_dataset_column_names(packed):
        dataset_format["columns"] = [*columns, "seq_lengths"]  # absent when there was no row to pack
    return packed.with_format(**dataset_format)


def _get_format(dataset: AnyDataset) -> dict[str, Any]:
    """Keyword arguments for `with_format` that restore the current format of `dataset`."""
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):  # the splits share one format
        dataset = next(iter(dataset.values()))
    if not isinstance(dataset, Dataset):  # IterableDataset
        return {"type": dataset._formatting.format_type if dataset._formatting else None}
    dataset_format = dict(dataset.format)
    return dataset_format | dataset_format.pop("format_kwargs")


def _token_columns(table: pa.Table) -> tuple[list[pa.Array], np.ndarray]:
    """The columns of a batch as single list arrays, and the (shared) number of tokens in each row."""
    if table.num_columns == 0:
        raise ValueError("pack_dataset needs at least one column of token lists, such as 'input_ids'.")
    # `ChunkedArray.combine_chunks` would copy even a single chunk.
    columns = [column.chunk(0) if column.num_chunks == 1 else column.combine_chunks() for column in table.columns]
    for name, column in zip(table.column_names, columns):
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            raise TypeError(
                f"Packing requires every column to hold a list per row, but {name!r} holds {column.type}. Drop it "
                f"first (`dataset.remove_columns({name!r})`) or keep only token columns (`dataset.select_columns`)."
            )
    lengths = [pc.list_value_length(column).fill_null(0).to_numpy() for column in columns]
    for name, column_lengths in zip(table.column_names[1:], lengths[1:]):
        if not np.array_equal(column_lengths, lengths[0]):
            raise ValueError(
                f"Packing requires all columns to have values of the same length in each row, but {name!r} and "
                f"{table.column_names[0]!r} differ; every packed column must hold one value per token."
            )
    return columns, lengths[0]


def _pack_bfd(table: pa.Table, seq_length: int, split: bool) -> pa.Table:
    """Best Fit Decreasing over the sequences of `table`, truncating (or, with `split`, splitting) overlong ones."""
    columns, lengths = _token_columns(table)
    # Cut each sequence into chunks of `seq_length` tokens, the last one shorter: views on the values, no copy.
    num_chunks = -(-lengths // seq_length)
    sequence = np.repeat(np.arange(len(lengths)), num_chunks)
    rank = np.arange(len(sequence)) - np.repeat(_offsets(num_chunks)[:-1], num_chunks)  # of a chunk in its sequence
    chunk_offsets = np.append(_offsets(lengths)[sequence] + rank * seq_length, lengths.sum())
    chunk_lengths = np.diff(chunk_offsets)
    kept = np.arange(len(sequence)) if split else np.flatnonzero(rank == 0)  # truncating keeps the first chunks

    bins = _best_fit_decreasing(chunk_lengths[kept], seq_length)
    order = kept[np.fromiter((i for chunks in bins for i in chunks), dtype=np.int64, count=len(kept))]
    row_chunk_offsets = _offsets([len(chunks) for chunks in bins])
    row_offsets = _offsets(chunk_lengths[order])[row_chunk_offsets]
    packed = []
    for column in columns:
        chunks = _list_array(column, chunk_offsets, column.flatten())
        packed.append(_list_array(column, row_offsets, chunks.take(order).flatten()))
    seq_lengths = pa.ListArray.from_arrays(
        pa.array(row_chunk_offsets, pa.int32()), pa.array(chunk_lengths[order], pa.int32())
    )
    return pa.Table.from_arrays([*packed, seq_lengths], names=[*table.column_names, "seq_lengths"])


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`: longest first, each item goes to the bin with the least room that still fits
    it (the earliest such bin on ties), or opens a new bin."""
    bins: list[list[int]] = []
    bins_by_room: dict[int, deque[int]] = defaultdict(deque)  # room left -> the bins with that room, oldest first
    rooms: list[int] = []  # sorted room values that some non-full bin has
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        at = bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            bin_index = bins_by_room[room].popleft()
            if not bins_by_room[room]:
                del rooms[at]
        else:
            room, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(i)
        room -= length
        if room:
            if not bins_by_room[room]:
                insort(rooms, room)
            bins_by_room[room].append(bin_index)
    return bins


def _pack_wrapped(table: pa.Table, seq_length: int) -> pa.Table:
    """Concatenate the sequences of `table` and cut them every `seq_length` tokens."""
    columns, lengths = _token_columns(table)
    total = int(lengths.sum())
    offsets = np.append(np.arange(0, total, seq_length), total)
    return pa.Table.from_arrays(
        [_list_array(column, offsets, column.flatten()) for column in columns], names=table.column_names
    )


def _offsets(sizes) -> np.ndarray:
    """`[0, s0, s0 + s1, ...]`: where each of consecutive runs of `sizes` starts, and the total."""
    return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))


def _list_array(like: pa.Array, offsets: np.ndarray, values: pa.Array) -> pa.Array:
    """A list array of the type of `like` (list or large list) made of `values` cut at `offsets`."""
    offset_type = pa.int64() if pa.types.is_large_list(like.type) else pa.int32()
    return type(like).from_arrays(pa.array(offsets, offset_type), values, type=like.type)

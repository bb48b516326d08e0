"""Row-level checks of raw datasets, shared by every trainer's preparation.

They run before tokenization, so a bad cell fails at construction with the column, the first bad row and the fix,
rather than deep inside `datasets.map` or as a model that silently learns nothing. Map-style datasets are checked in
full through Arrow (fast, no Python loop over rows for string columns); a streamed dataset only on its first row.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from .formats import get_dataset_column_names

logger = logging.getLogger(__name__)

TEXT, MESSAGES = "a string", "a list of messages"


def check_text_columns(
    dataset: Dataset | IterableDataset,
    columns: Sequence[str],
    name: str = "train",
    non_empty: Sequence[str] = (),
    conversations: Sequence[str] = (),
) -> None:
    """Raise a `ValueError` naming the column and first row whose cell is None or neither a string nor a list of
    messages (a conversation); `non_empty` columns must not hold empty strings either, and `conversations` columns
    must hold lists of messages. A conversation must not be empty, and each of its messages needs a 'role' and a
    'content'; roles a chat template may not know (other than system, user, assistant, tool, ...) are warned about.
    Columns the dataset lacks are skipped. The checked fields of one row must be all strings or all conversations.
    """
    present = [column for column in columns if column in get_dataset_column_names(dataset)]
    if not present:
        return
    if isinstance(dataset, Dataset):
        if len(dataset) == 0:
            return
        table = dataset.with_format("arrow")
        kinds = {column: _arrow_kind(table[column], column, name, column in non_empty) for column in present}
    else:
        row = next(iter(dataset), None)
        if row is None:
            return
        kinds = {column: _value_kind(row[column], column, 0, name, column in non_empty) for column in present}
    for column in conversations:
        if kinds.get(column) == TEXT:
            raise ValueError(
                f"Column '{column}' of the {name} dataset holds strings, but every '{column}' cell must be a list of "
                "messages ({'role': ..., 'content': ...}). If the strings are JSON, parse them, e.g. "
                f"`dataset.map(lambda row: {{'{column}': json.loads(row['{column}'])}})`."
            )
    _check_one_format(kinds, 0, name)


def _bad_cell(column: str, row: int, name: str, problem: str, non_empty: bool) -> ValueError:
    if non_empty:
        expected, keep = "a non-empty string", f"isinstance(row['{column}'], str) and row['{column}'] != ''"
    else:
        expected = f"{TEXT} or {MESSAGES} ({{'role': ..., 'content': ...}})"
        keep = f"isinstance(row['{column}'], (str, list))"
    return ValueError(
        f"Column '{column}' of the {name} dataset {problem} at row {row}: every '{column}' cell must be {expected}. "
        f"Fix or drop such rows, e.g. `dataset.filter(lambda row: {keep})`."
    )


def _arrow_kind(array: pa.ChunkedArray, column: str, name: str, non_empty: bool) -> str:
    """`TEXT` or `MESSAGES`: what every cell of `array` holds, or raise on its first bad cell."""
    first_null = pc.index(pc.is_null(array), True).as_py()
    if first_null >= 0:
        raise _bad_cell(column, first_null, name, "is None", non_empty)
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        if non_empty:
            first_empty = pc.index(pc.equal(array, ""), True).as_py()
            if first_empty >= 0:
                raise _bad_cell(column, first_empty, name, "is an empty string", non_empty)
        return TEXT
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if is_list and pa.types.is_struct(kind.value_type) and not non_empty:
        _check_conversations(array.combine_chunks(), column, name)
        return MESSAGES
    return _value_kind(array[0].as_py(), column, 0, name, non_empty)  # raises: a number, a list of strings, ...


def _value_kind(value: Any, column: str, row: int, name: str, non_empty: bool) -> str:
    """`TEXT` or `MESSAGES`: what `value` holds, or raise naming `column` and `row`."""
    if value is None:
        raise _bad_cell(column, row, name, "is None", non_empty)
    if isinstance(value, str):
        if non_empty and not value:
            raise _bad_cell(column, row, name, "is an empty string", non_empty)
        return TEXT
    if isinstance(value, list) and all(isinstance(message, dict) for message in value) and not non_empty:
        if not value:
            raise _bad_conversation(column, row, name, "is an empty list of messages")
        for index, message in enumerate(value):
            _check_message_keys(message.keys(), message, column, row, index, name)
        _warn_unknown_roles({message.get("role") for message in value}, column, row, name)
        return MESSAGES
    raise _bad_cell(column, row, name, f"holds {type(value).__name__} {short_repr(value)}", non_empty)


KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})


def _bad_conversation(column: str, row: int, name: str, problem: str) -> ValueError:
    return ValueError(
        f"Column '{column}' of the {name} dataset {problem} at row {row}: every '{column}' cell must be a non-empty "
        f"list of messages, each {{'role': ..., 'content': ...}}. Fix or drop such rows, e.g. "
        f"`dataset.filter(lambda row: len(row['{column}']) > 0)`."
    )


def _check_message_keys(keys: Any, message: dict | None, column: str, row: int, index: int, name: str) -> None:
    """Raise unless a message has a 'role' and a 'content' (None content is fine beside 'tool_calls')."""
    keys = set(keys)
    for key in ("role", "content"):
        missing = key not in keys or (message is not None and message[key] is None)
        if missing and key == "content" and message is not None and message.get("tool_calls"):
            continue
        if missing:
            present = sorted(k for k in keys if message is None or message[k] is not None)
            raise ValueError(
                f"Column '{column}' of the {name} dataset has a message without '{key}' at row {row} (message "
                f"{index}, keys {present}): every message must be {{'role': ..., 'content': ...}}. Rename the keys, "
                f"e.g. `dataset.map(lambda row: {{'{column}': [{{'role': m['from'], 'content': m['value']}} for m in "
                f"row['{column}']]}})` for 'from'/'value' messages."
            )


def _check_conversations(array: pa.ListArray, column: str, name: str) -> None:
    """The conversation checks of `_value_kind`, through Arrow on a whole list<struct> column."""
    first_empty = pc.index(pc.equal(pc.list_value_length(array), 0), True).as_py()
    if first_empty >= 0:
        raise _bad_conversation(column, first_empty, name, "is an empty list of messages")
    messages = pc.list_flatten(array)
    fields = {messages.type.field(i).name for i in range(messages.type.num_fields)}
    parents = pc.list_parent_indices(array)
    for key in ("role", "content"):
        missing = pc.is_null(pc.struct_field(messages, key)) if key in fields else None
        if missing is not None and key == "content" and "tool_calls" in fields:
            missing = pc.and_(missing, pc.is_null(pc.struct_field(messages, "tool_calls")))
        position = 0 if missing is None else pc.index(missing, True).as_py()
        if position >= 0:
            row = parents[position].as_py()
            message = messages[position].as_py()
            _check_message_keys(fields, message, column, row, position - array.offsets[row].as_py(), name)
    if "role" in fields:
        roles = set(pc.unique(pc.struct_field(messages, "role")).to_pylist())
        unknown = roles - KNOWN_ROLES
        if unknown:
            matches = pc.is_in(pc.struct_field(messages, "role"), value_set=pa.array(sorted(unknown)))
            _warn_unknown_roles(unknown, column, parents[pc.index(matches, True).as_py()].as_py(), name)


def _warn_unknown_roles(roles: set, column: str, row: int, name: str) -> None:
    unknown = sorted(str(role) for role in roles - KNOWN_ROLES)
    if unknown:
        logger.warning(
            "Column '%s' of the %s dataset has messages with role(s) %s (first at row %d), which chat templates may "
            "render as given or reject: they know 'system', 'user', 'assistant' and 'tool'. Rename them, e.g. "
            "'bot' -> 'assistant', 'human' -> 'user'.",
            column,
            name,
            unknown,
            row,
        )


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_one_format(kinds: dict[str, str], row: int, name: str) -> None:
    conversational = [column for column, kind in kinds.items() if kind == MESSAGES]
    plain = [column for column, kind in kinds.items() if kind == TEXT]
    if conversational and plain:
        raise ValueError(
            f"Row {row} of the {name} dataset mixes conversational and plain-text fields: {conversational} hold "
            f"lists of messages but {plain} hold strings. Use one format for all of them: wrap the strings as "
            "messages (e.g. [{'role': 'assistant', 'content': text}]), or render the conversations to text with "
            "`tokenizer.apply_chat_template(messages, tokenize=False)`."
        )


def check_labels(dataset: Dataset | IterableDataset, column: str = "label", name: str = "train") -> None:
    """Raise a `ValueError` naming the row and value of the first `column` cell that is not a boolean (True for a
    desirable completion); 0 and 1 are accepted, as TRL's `torch.as_tensor(labels, dtype=torch.bool)` reads them."""

    def first_bad(array: pa.ChunkedArray) -> int | None:
        if pa.types.is_boolean(array.type):
            return -1
        if pa.types.is_integer(array.type):
            return pc.index(pc.invert(pc.is_in(array, value_set=pa.array([0, 1], type=array.type))), True).as_py()
        return None

    for row, value in _cells_to_check(dataset, column, first_bad):
        if not (isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1))):
            raise ValueError(
                f"Column '{column}' of the {name} dataset holds {value!r} at row {row}, but labels must be booleans: "
                "True for a desirable completion, False for an undesirable one (0 and 1 are accepted). Convert them, "
                f"e.g. `dataset.map(lambda row: {{'{column}': row['{column}'] == 'yes'}})`."
            )


def check_numbers(dataset: Dataset | IterableDataset, column: str, name: str = "train") -> None:
    """Raise a `ValueError` naming the row and value of the first `column` cell that is not a finite number (a
    reward `margin` given as text, None, NaN, ...); a dataset without the column passes."""

    def first_bad(array: pa.ChunkedArray) -> int | None:
        if pa.types.is_integer(array.type):
            return -1
        if pa.types.is_floating(array.type):
            return pc.index(pc.invert(pc.is_finite(array)), True).as_py()
        return None

    for row, value in _cells_to_check(dataset, column, first_bad):
        if not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise ValueError(
                f"Column '{column}' of the {name} dataset holds {value!r} at row {row}, but every '{column}' cell must "
                f"be a finite number. Convert them, e.g. `dataset.map(lambda row: {{'{column}': "
                f"float(row['{column}'])}})`, or drop such rows."
            )


def warn_identical_pairs(dataset: Dataset | IterableDataset, name: str = "train") -> None:
    """Warn with their count when preference pairs have `chosen == rejected`: such a pair prefers nothing, so it
    gives no gradient to the preference loss and only dilutes the batch."""
    if not isinstance(dataset, Dataset) or not {"chosen", "rejected"} <= set(dataset.column_names):
        return
    table = dataset.with_format("arrow")
    chosen, rejected = table["chosen"], table["rejected"]
    if chosen.type == rejected.type and (pa.types.is_string(chosen.type) or pa.types.is_large_string(chosen.type)):
        count = pc.sum(pc.equal(chosen, rejected)).as_py() or 0
    else:
        count = sum(c == r for c, r in zip(chosen.to_pylist(), rejected.to_pylist()))
    if count:
        logger.warning(
            "%d of %d %s pairs have chosen == rejected: they express no preference, so the loss gets no gradient from "
            "them. Drop them, e.g. `dataset.filter(lambda row: row['chosen'] != row['rejected'])`.",
            count,
            len(dataset),
            name,
        )


def check_rows_kept(before: int | None, dataset: Dataset | IterableDataset, name: str, reason: str, fix: str) -> None:
    """After a filter that dropped rows for being too long: warn when some were dropped, and raise a `ValueError`
    when none is left (training would otherwise stop on an empty dataloader). `before` is the row count before the
    filter, None for a stream (not counted)."""
    if before is None or not isinstance(dataset, Dataset):
        return
    dropped = before - len(dataset)
    if dropped and not len(dataset):
        raise ValueError(f"All {before} rows of the {name} dataset were dropped: {reason}. {fix}")
    if dropped:
        logger.warning("Dropped %d of %d %s rows: %s. %s", dropped, before, name, reason, fix)


def _cells_to_check(
    dataset: Dataset | IterableDataset, column: str, first_bad: Callable[[pa.ChunkedArray], int | None]
) -> Iterable[tuple[int, Any]]:
    """The `(row, value)` cells of `column` a check must look at: none when the dataset lacks the column; for a
    map-style dataset without nulls, the one cell `first_bad(arrow_column)` finds by type (-1: none; None: it cannot
    tell, so every cell); for a stream, its first row."""
    if column not in get_dataset_column_names(dataset):
        return []
    if isinstance(dataset, Dataset):
        array = dataset.with_format("arrow")[column]
        bad = first_bad(array) if array.null_count == 0 else None
        if bad is None:
            return enumerate(array.to_pylist())
        return [] if bad < 0 else [(bad, array[bad].as_py())]
    row = next(iter(dataset), None)
    return [] if row is None else [(0, row[column])]

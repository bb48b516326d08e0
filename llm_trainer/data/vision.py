"""Image columns of vision-language datasets: reading a row's images, and checking a dataset before training.

TRL's VLM datasets hold either an `image` column (one image a row) or an `images` column (a list a row), next to
conversational `messages` / `prompt` / ... columns whose string contents get one `{"type": "image"}` placeholder per
image (`prepare_multimodal_messages`). The check here runs at trainer construction, so a text-only model given image
data, an image that does not decode, or a row asking for more images than it holds fails with the row, the column and
the fix, instead of as a shape mismatch inside the model's forward.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

from datasets import Dataset, IterableDataset

from .chat_template import apply_chat_template
from .formats import get_dataset_column_names, is_conversational, prepare_multimodal_messages

__all__ = ["IMAGE_COLUMNS", "cell_images", "check_vision_dataset", "count_image_placeholders", "row_images"]

IMAGE_COLUMNS = ("image", "images")
# Columns that receive a row's images (the first one present); the other message columns get none.
_IMAGE_RECEIVERS = ("messages", "prompt")
_CHECK_BATCH = 256


def cell_images(value: Any) -> list[Any]:
    """The raw images of one `image` / `images` cell: None -> [], a list as is, anything else as one image."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _open_image(value: Any, *, load: bool):
    """A PIL image from a PIL image, encoded bytes, a `{"bytes", "path"}` dict (a `datasets.Image` cell), a path or
    an array. `load=False` only parses and verifies the file (no pixel decoding)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError('Image datasets need Pillow: pip install "llm-trainer[vision]"') from error

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is None:
            raise ValueError("the cell has neither 'bytes' nor 'path'")
        value = data if data is not None else path
    if isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            raise ValueError(f"no file at {str(value)!r}")
        source = value
    elif hasattr(value, "__array__"):
        import numpy as np

        return Image.fromarray(np.asarray(value))
    else:
        raise ValueError(f"expected an image, encoded bytes or a path, got {type(value).__name__}")
    image = Image.open(source)
    if load:
        image.load()
    else:
        image.verify()
    return image


def _decode(value: Any, index: int, column: str, dataset_name: str, *, load: bool):
    if value is None:
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset: column '{column}' holds a missing image (None) inside its "
            "list. Remove the None entries, or drop the row."
        )
    try:
        return _open_image(value, load=load)
    except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset: the image in column '{column}' cannot be decoded ({error}). "
            "Fix or drop the row, e.g. `dataset.filter(lambda row, i: i != "
            f"{index}, with_indices=True)`."
        ) from error


def row_images(row: dict[str, Any], index: int, dataset_name: str = "train") -> list:
    """The images of one dataset row as PIL images: `image` -> `[image]`, `images` -> the list, none -> `[]`.

    Cells may hold PIL images, encoded bytes, `{"bytes", "path"}` dicts or file paths. An image that fails to decode
    raises a `ValueError` naming the row `index` and the column.
    """
    column = next((name for name in IMAGE_COLUMNS if name in row), None)
    if column is None:
        return []
    return [_decode(value, index, column, dataset_name, load=True) for value in cell_images(row[column])]


def _content_parts(messages: Any) -> Iterator[tuple[str, Any]]:
    """`(role, content)` of each message in a conversation (nothing for a plain string)."""
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                yield message.get("role"), message.get("content")


def count_image_placeholders(value: Any, image_token: str | None = None) -> tuple[int, bool]:
    """`(placeholders, has_string_user_turn)` of one text or conversation cell.

    Placeholders are the unfilled `{"type": "image"}` parts outside tool messages (those `prepare_multimodal_messages`
    fills with the row's images), plus the occurrences of `image_token` written in the text. The flag says whether a
    user message has string content, into which `prepare_multimodal_messages` inserts one placeholder per image.
    """
    if isinstance(value, str):
        return (value.count(image_token) if image_token else 0), False
    count, string_user = 0, False
    for role, content in _content_parts(value):
        if isinstance(content, str):
            string_user = string_user or role == "user"
            count += content.count(image_token) if image_token else 0
        elif isinstance(content, list) and role != "tool":
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "image" and part.get("image") is None:
                    count += 1
                elif image_token and isinstance(part.get("text"), str):
                    count += part["text"].count(image_token)
    return count, string_user


def _check_placeholders(
    row: dict[str, Any],
    num_images: int,
    message_columns: Sequence[str],
    image_token: str | None,
    index: int,
    name: str,
) -> None:
    """Raise when the row's message columns ask for more images than it holds (or cannot receive the ones it has)."""
    present = [column for column in message_columns if column in row and row[column] is not None]
    receiver = next((column for column in _IMAGE_RECEIVERS if column in present), present[0] if present else None)
    for column in present:
        placeholders, string_user = count_image_placeholders(row[column], image_token)
        images = num_images if column == receiver else 0
        # A user turn given as a string gets one placeholder per image inserted in front of it.
        total = placeholders + (images if string_user and not isinstance(row[column], str) else 0)
        if total > images:
            where = "image placeholders" + (f" ({{'type': 'image'}} parts or {image_token!r})" if image_token else "")
            if column == receiver:
                holds = f"{images} image{'s' if images != 1 else ''}"
            else:
                holds = f"no images for it (only column '{receiver}' receives the row's images)"
            raise ValueError(
                f"Row {index} of the {name} dataset: column '{column}' has {total} {where}, but the row holds "
                f"{holds}. Remove the extra placeholders from the row, or add the missing images to its "
                f"'{'images' if 'images' in row else 'image'}' column."
            )
        if column == receiver and not isinstance(row[column], str) and total < images:
            raise ValueError(
                f"Row {index} of the {name} dataset: the row holds {images} images but column '{column}' has only "
                f"{total} image placeholders ({{'type': 'image'}} parts), and no user message with plain-string "
                "content to put the rest in front of. Add one `{'type': 'image'}` part per image, or give the first "
                "user message plain-string content."
            )


def _raw_rows(dataset: Dataset | IterableDataset, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of `columns`, images left encoded (`{"bytes", "path"}`): all rows of a map-style dataset, the first of a
    stream."""
    if isinstance(dataset, Dataset):
        table_batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=_CHECK_BATCH)
        for table in table_batches:
            yield from table.to_pylist()
    else:
        row = next(iter(dataset), None)
        if row is not None:
            yield {column: row.get(column) for column in columns}


def check_vision_dataset(
    dataset: Dataset | IterableDataset,
    *,
    model_is_vlm: bool,
    message_columns: Sequence[str],
    trainer: str,
    dataset_name: str = "train",
    image_token: str | None = None,
) -> bool:
    """Whether `dataset` is a vision dataset (has an `image` or `images` column), after checking it can be trained on.

    Raises a `ValueError` naming the column and the fix when the model is text-only (`model_is_vlm` False) or both
    image columns are present; and naming the row when a row's `message_columns` hold more image placeholders
    (`{"type": "image"}` parts, or `image_token` in the text when given) than the row has images, or when one of its
    images does not decode. A map-style dataset is checked row by row (images parsed and verified, not decoded), a
    streamed one on its first row. `trainer` names the trainer in the messages.
    """
    if dataset is None:
        return False
    columns = get_dataset_column_names(dataset)
    image_columns = [column for column in IMAGE_COLUMNS if column in columns]
    if not image_columns:
        return False
    if len(image_columns) > 1:
        raise ValueError(
            f"The {dataset_name} dataset has both an 'image' and an 'images' column; {trainer} reads one. Merge them "
            "into an 'images' list column, or drop one with `dataset.remove_columns(...)`."
        )
    column = image_columns[0]
    if not model_is_vlm:
        raise ValueError(
            f"The {dataset_name} dataset is vision-related (it has an '{column}' column), but the model given to "
            f"{trainer} is not a vision-language model (its config has no `vision_config`). Pass a vision-language "
            "model (and its processor as `processing_class`), or drop the images with "
            f"`dataset.remove_columns('{column}')`."
        )
    text_columns = [name for name in message_columns if name in columns]
    for index, row in enumerate(_raw_rows(dataset, [column, *text_columns])):
        images = cell_images(row[column])
        for value in images:
            _decode(value, index, column, dataset_name, load=False)
        _check_placeholders(row, len(images), text_columns, image_token, index, dataset_name)
    return True


def batch_row_images(examples: Sequence[dict[str, Any]]) -> list[list] | None:
    """Each row's images as PIL images (`row_images`), or None when no row has one (processors refuse empty lists)."""
    images = [row_images(example, index, "batch") for index, example in enumerate(examples)]
    return images if any(images) else None


def render_vision_rows(
    examples: Sequence[dict[str, Any]], processor: Any, completion_keys: tuple[str, ...], images: list[list] | None
) -> list[dict[str, str]]:
    """Text rows: conversational rows get one image placeholder per image in their prompt
    (`prepare_multimodal_messages`) and are rendered with the processor's chat template (with the row's `tools` and
    `chat_template_kwargs`); standard rows are returned as they are (their text holds the image tokens)."""
    if not is_conversational(examples[0]):
        return [{key: example[key] for key in ("prompt", *completion_keys)} for example in examples]
    rendered = []
    for index, example in enumerate(examples):
        row = {"prompt": prepare_multimodal_messages(example["prompt"], images=images[index] if images else None)}
        row.update({key: prepare_multimodal_messages(example[key]) for key in completion_keys})
        if example.get("chat_template_kwargs"):
            row["chat_template_kwargs"] = example["chat_template_kwargs"]
        rendered.append(apply_chat_template(row, processor, tools=example.get("tools")))
    return rendered


def refuse_image_columns(dataset: Dataset | IterableDataset, trainer: str, name: str = "train") -> None:
    """Raise a `ValueError` when a trainer that reads text only gets an `image` / `images` column.

    TRL's text-only trainers drop such columns unseen; here the images would be silently ignored, so the run would
    train on questions about pictures it never sees.
    """
    present = [column for column in IMAGE_COLUMNS if column in get_dataset_column_names(dataset)]
    if present:
        raise ValueError(
            f"The {name} dataset has image column(s) {present}, but {trainer} trains on text only (as in TRL 1.16), so "
            "the images would be ignored. Drop the column(s) (`dataset.remove_columns(...)`) to train on the text "
            "alone, or use a trainer that takes images: SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer or RLOOTrainer."
        )

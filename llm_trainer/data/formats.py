"""Recognise how a dataset is laid out, and bring legacy or multimodal messages to the standard shape.

An example is *conversational* when its text fields hold lists of `{"role": ..., "content": ...}` messages and
*standard* when they hold plain strings. Its *type* follows from its keys: `text` or `messages` (language modeling),
`prompt` (prompt-only), `prompt` + `completion`, `prompt` + `chosen` + `rejected` (preference), `chosen` +
`rejected` (preference with an implicit prompt) and `prompt` + `completion` + `label` (unpaired preference).
"""

from __future__ import annotations

from typing import Any, TypeVar

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

AnyDataset = TypeVar("AnyDataset", Dataset, DatasetDict, IterableDataset, IterableDatasetDict)

# Fields that hold plain text in a standard dataset and lists of messages in a conversational one.
_MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "completion", "messages")
_CHATML_NAMES = {"from": "role", "value": "content"}
_ROLES = ("system", "user", "assistant", "tool")


def _starts_with_message(value: Any, *keys: str) -> bool:
    """Whether `value` is a non-empty list whose first item is a dict holding all of `keys`."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and all(k in value[0] for k in keys)


def is_conversational(example: dict[str, Any]) -> bool:
    """Whether `example` holds messages (lists of dicts with a `"role"`) rather than plain strings.

    The first of `prompt`, `chosen`, `rejected`, `completion`, `messages` present in the example decides.

    Example:
    ```python
    >>> is_conversational({"prompt": [{"role": "user", "content": "What color is the sky?"}]})
    True
    >>> is_conversational({"prompt": "The sky is"})
    False
    ```
    """
    field = next((field for field in _MESSAGE_FIELDS if field in example), None)
    return field is not None and _starts_with_message(example[field], "role")


def is_conversational_from_value(example: dict[str, Any]) -> bool:
    """Whether `example` holds a `conversations` list of `{"from", "value"}` messages (ShareGPT style).

    Prefer the ChatML layout (`role` / `content`); [`maybe_convert_to_chatml`] converts to it.

    Example:
    ```python
    >>> is_conversational_from_value({"conversations": [{"from": "user", "value": "What color is the sky?"}]})
    True
    >>> is_conversational_from_value({"conversations": [{"role": "user", "content": "What color is the sky?"}]})
    False
    ```
    """
    return _starts_with_message(example.get("conversations"), "from", "value")


def maybe_convert_to_chatml(example: dict[str, Any]) -> dict[str, Any]:
    """Rename `from`/`value` message keys to `role`/`content`, and a `conversations` field to `messages`.

    Fields already in ChatML are returned unchanged; the input example is not modified.

    Example:
    ```python
    >>> maybe_convert_to_chatml(
    ...     {"conversations": [{"from": "user", "value": "What color is the sky?"}, {"from": "assistant", "value": "Blue."}]}
    ... )
    {'messages': [{'role': 'user', 'content': 'What color is the sky?'}, {'role': 'assistant', 'content': 'Blue.'}]}
    ```
    """
    converted = {
        key: _to_chatml(value) if key in (*_MESSAGE_FIELDS, "conversations") else value
        for key, value in example.items()
    }
    if "conversations" in converted:
        converted["messages"] = converted.pop("conversations")
    return converted


def _to_chatml(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages
    return [
        {_CHATML_NAMES.get(key, key): value for key, value in message.items()}
        if isinstance(message, dict)
        else message
        for message in messages
    ]


def prepare_multimodal_messages(messages: list[dict[str, Any]], images: list | None = None) -> list[dict[str, Any]]:
    """Turn messages into the structured form multimodal processors expect, with `images` filled in.

    String contents become `[{"type": "text", "text": ...}]`; the first user message with string content is preceded
    by one `{"type": "image"}` placeholder per image. Then every placeholder without an `"image"` (outside tool
    messages) receives the next image, in order. Messages already structured are kept, and the input is not modified.

    Example:
    ```python
    >>> prepare_multimodal_messages([{"role": "user", "content": "What's in this image?"}], images=[image])
    [{'role': 'user', 'content': [{'type': 'image', 'image': image}, {'type': 'text', 'text': "What's in this image?"}]}]
    ```
    """
    images = list(images or [])
    structured = []
    placeholders_added = False
    for message in messages:
        if message["role"] not in _ROLES:
            raise ValueError(f"Invalid role {message['role']!r} in a message; expected one of {_ROLES}.")
        content = message.get("content")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placeholders_added:
                blocks = [{"type": "image"} for _ in images] + blocks
                placeholders_added = True
            message = {**message, "content": blocks}
        structured.append(message)

    fillable = [i for i, message in enumerate(structured) if message["role"] != "tool" and message.get("content")]
    num_slots = sum(_is_image_slot(part) for i in fillable for part in structured[i]["content"])
    if num_slots != len(images):
        raise ValueError(
            f"{len(images)} images were given but the messages have {num_slots} image placeholders "
            "({'type': 'image'} blocks without an 'image'); give exactly one image per placeholder."
        )
    remaining = iter(images)
    for i in fillable:
        content = structured[i]["content"]
        if any(_is_image_slot(part) for part in content):
            content = [{**part, "image": next(remaining)} if _is_image_slot(part) else part for part in content]
            structured[i] = {**structured[i], "content": content}
    return structured


def _is_image_slot(part: dict[str, Any]) -> bool:
    return part.get("type") == "image" and "image" not in part


def get_dataset_column_names(dataset: Dataset | DatasetDict | IterableDataset | IterableDatasetDict) -> list[str]:
    """Column names of `dataset` (of its first split for a dict), reading one row when a stream doesn't know them."""
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = next(iter(dataset.values()))
    return dataset.column_names or list(next(iter(dataset), {}))

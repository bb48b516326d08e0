"""Dataset plumbing shared by the trainers: format detection, chat templates, preference pairs and packing."""

from .chat_template import (
    apply_chat_template,
    common_prefix_length,
    extract_prompt,
    maybe_apply_chat_template,
    maybe_extract_prompt,
)
from .formats import (
    get_dataset_column_names,
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
    prepare_multimodal_messages,
)
from .packing import pack_dataset
from .preference import maybe_unpair_preference_dataset, unpair_preference_dataset

__all__ = [
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

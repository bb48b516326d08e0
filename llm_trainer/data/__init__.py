"""Dataset plumbing shared by the trainers: format detection, chat templates, preference pairs and packing.

Names resolve lazily (importing `datasets` on first use), so the top-level package and `llm_trainer.data_utils` can
derive their lists from `__all__` here.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "chat_template": [
        "apply_chat_template",
        "common_prefix_length",
        "extract_prompt",
        "maybe_apply_chat_template",
        "maybe_extract_prompt",
    ],
    "formats": [
        "get_dataset_column_names",
        "is_conversational",
        "is_conversational_from_value",
        "maybe_convert_to_chatml",
        "prepare_multimodal_messages",
    ],
    "packing": ["pack_dataset"],
    "preference": ["maybe_unpair_preference_dataset", "unpair_preference_dataset"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

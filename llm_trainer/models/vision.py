"""Vision-language model helpers: loading a VLM's processor, with an images-only route for Qwen-VL processors.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors hold a video processor, and transformers' video processors need
torchvision. Training on images does not use it, so where torchvision is missing (CPU-only machines whose package
index carries only CUDA torchvision wheels) `load_processor` builds the same processor without its video half: the
tokenizer, image processor, chat template and image-token bookkeeping are the family's own classes. The processor
saves under its family's class name, so the checkpoint loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl import Qwen3VLProcessor
from transformers.utils import is_torchvision_available


class _ImagesOnly:
    """Mixin for a processor class whose `__init__` takes no video processor (so transformers checks none)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self.family_class.__name__  # reloads as the family's own processor
        return output


class ImagesOnlyQwen2VLProcessor(_ImagesOnly, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen2VLProcessor


class ImagesOnlyQwen2_5_VLProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen2_5_VLProcessor


class ImagesOnlyQwen3VLProcessor(_ImagesOnly, Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen3VLProcessor


IMAGES_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.family_class.__name__: cls
    for cls in (ImagesOnlyQwen2VLProcessor, ImagesOnlyQwen2_5_VLProcessor, ImagesOnlyQwen3VLProcessor)
}


def _processor_class_name(path: str | os.PathLike) -> str | None:
    """The `processor_class` a local processor folder declares, if any."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                value = json.load(f).get("processor_class")
            if value:
                return value
    return None


def load_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained`; a local Qwen-VL processor loads images-only where torchvision is missing."""
    if not is_torchvision_available() and os.path.isdir(name_or_path):
        cls = IMAGES_ONLY_PROCESSORS.get(_processor_class_name(name_or_path) or "")
        if cls is not None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
            chat_template = getattr(tokenizer, "chat_template", None)
            return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    return AutoProcessor.from_pretrained(name_or_path, **kwargs)

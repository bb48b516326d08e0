"""Images-only processors: a VLM family's own processor without the parts that need torchvision or audio.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, SmolVLM and Gemma 4 processors hold a video processor, and transformers'
video processors need torchvision (SmolVLM's also `num2words`; Gemma 4's processor an audio feature extractor too).
Training on images uses neither, so where they cannot be built (CPU-only machines whose package index carries only
CUDA torchvision wheels) `models.vision.load_processor` builds one of these instead: the tokenizer, image processor,
chat template and image-token bookkeeping are the family's own classes. Each saves under its family's class name, so
the checkpoint loads with `AutoProcessor` wherever torchvision is installed. Imported only when needed (the families
need a recent transformers).
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin
from transformers.models.gemma4 import Gemma4Processor
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl import Qwen3VLProcessor
from transformers.models.smolvlm import SmolVLMProcessor
from transformers.utils import is_num2words_available, is_torchvision_available


class _SavedAsFamily:
    """Mixin: an images-only processor saves under its family's processor class (`family_class`)."""

    family_class: type[ProcessorMixin]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self.family_class.__name__  # reloads as the family's own processor
        return output


class _ImagesOnly(_SavedAsFamily):
    """Mixin for a processor class whose `__init__` takes no video processor (so transformers checks none)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None


class ImagesOnlyQwen2VLProcessor(_ImagesOnly, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen2VLProcessor


class ImagesOnlyQwen2_5_VLProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen2_5_VLProcessor


class ImagesOnlyQwen3VLProcessor(_ImagesOnly, Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (no torchvision needed)."""

    family_class = Qwen3VLProcessor


class ImagesOnlySmolVLMProcessor(_SavedAsFamily, SmolVLMProcessor):
    """`SmolVLMProcessor` without the video processor (no torchvision, no `num2words`, which only videos use)."""

    family_class = SmolVLMProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor.__init__ refuses to run without num2words; set up the same image-token state, then the
        # common processor state with the two image-side attributes.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = None

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The generic chat-template rendering (SmolVLM's own reads video-sampling defaults off the video processor)."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class ImagesOnlyGemma4Processor(_SavedAsFamily, Gemma4Processor):
    """`Gemma4Processor` without its video processor (torchvision) and audio feature extractor."""

    family_class = Gemma4Processor

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 280,
        audio_seq_length: int = 750,
        audio_ms_per_token: int = 40,
        **kwargs,
    ):
        # The image and special-token state Gemma4Processor.__init__ sets up, without adding the video token to the
        # tokenizer as it does (only videos use it).
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        self.boi_token, self.eoi_token, self.image_token = (
            tokenizer.boi_token,
            tokenizer.eoi_token,
            tokenizer.image_token,
        )
        self.video_token = "<|video|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.audio_seq_length, self.audio_ms_per_token = audio_seq_length, audio_ms_per_token
        for name in ("audio_token", "audio_token_id", "boa_token", "eoa_token"):
            setattr(self, name, getattr(tokenizer, name, None))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.feature_extractor = self.video_processor = None


IMAGES_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.family_class.__name__: cls
    for cls in (
        ImagesOnlyQwen2VLProcessor,
        ImagesOnlyQwen2_5_VLProcessor,
        ImagesOnlyQwen3VLProcessor,
        ImagesOnlySmolVLMProcessor,
        ImagesOnlyGemma4Processor,
    )
}


def video_processor_available(processor_class: str) -> bool:
    """Whether transformers can build `processor_class`'s video processor here."""
    if processor_class == SmolVLMProcessor.__name__ and not is_num2words_available():
        return False
    return is_torchvision_available()

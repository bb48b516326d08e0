"""Tiny vision-language model builders behind `llm_trainer.testing.make_tiny_vlm`, one per family.

Each builder takes the shipped tokenizer, adds the family's image tokens, and returns a random-weight model (hidden
size 32, 2 layers) with the family's processor: its PIL image processor (no torchvision) at tiny image sizes and a
chat template in the family's layout that renders image parts, with `{% generation %}` around assistant text.
"""

from __future__ import annotations

import functools
from typing import Literal

VLMFamily = Literal[
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "qwen3_5_think",
    "qwen3_5_moe",
    "llava",
    "llava_next",
    "idefics2",
    "idefics3",
    "smolvlm",
    "gemma3",
    "gemma4",
    "paligemma",
]

# ChatML with Qwen-VL's vision block for each image part; `{% generation %}` around assistant text.
_QWEN_VL_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3.5 with thinking on: the assistant's `reasoning_content` in a `<think>` block before its answer (an empty one
# when it has none), and a generation prompt that opens the block.
_QWEN_THINK_TEMPLATE = _QWEN_VL_TEMPLATE.replace(
    "{%- if message['role'] == 'assistant' %}{%- generation %}",
    "{%- if message['role'] == 'assistant' %}{%- generation %}"
    "{{- '<think>\\n' + (message['reasoning_content'] or '') + '\\n</think>\\n\\n' }}",
).replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}",
)

# LLaVA-1.5's `USER: <image>\n... ASSISTANT: ...` layout, each turn closed by the eos token.
_LLAVA_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- 'ASSISTANT: ' }}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['role'].upper() + ': ' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<image>\\n' }}{%- endif %}{%- endfor %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT: ' }}{%- endif %}"
)


# LLaVA-1.6 (Mistral) `[INST] <image>\n... [/INST] ...` layout, each answer closed by the eos token.
_LLAVA_NEXT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' }}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- eos_token }}{%- endgeneration %}"
    "{%- else %}{{- '[INST] ' }}{%- if message['role'] == 'system' %}{{- '<<SYS>>' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<image>\n' }}{%- endif %}{%- endfor %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- ' [/INST]' }}"
    "{%- endif %}{%- endfor %}"
)

# Idefics2 / Idefics3 / SmolVLM: `User:<image>...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n`, the
# `<end_of_utterance>` being the eos token; `prefix` opens the conversation (SmolVLM's `<|im_start|>`).
_IDEFICS_TEMPLATE = (
    "{{- prefix }}"
    "{%- for message in messages %}"
    "{{- message['role'][:1].upper() + message['role'][1:] + ':' }}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' }}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- eos_token }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{%- if message['content'] is string %}{{- ' ' + message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'text' %}{{- ' ' + part['text'] if loop.first else part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- eos_token + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

# Gemma 3: `<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...<end_of_turn>\n`, the system
# message folded into the first user turn, `<start_of_image>` for each image part, `<end_of_turn>` the eos token.
_GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{%- if message['role'] == 'assistant' %}{{- '<start_of_turn>model\n' }}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- eos_token }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}{{- '<start_of_turn>' + message['role'] + '\n' }}"
    "{%- if system is not none and loop.index0 == 1 %}"
    "{%- if system is string %}{{- system }}{%- else %}{%- for part in system %}{{- part['text'] }}{%- endfor %}{%- endif %}"
    "{{- '\n\n' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- eos_token + '\n' }}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

# PaliGemma is a prefix-LM: every `<image>` first (its processor puts `<bos>` after the last one), then the turns as
# `role: text` lines; the answer closed by the eos token.
_PALIGEMMA_TEMPLATE = (
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<image>' }}{%- endif %}{%- endfor %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' }}"
    "{%- if message['role'] == 'assistant' %}{%- generation %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- endif %}{{- '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)


def _add_tokens(tokenizer, tokens: list[str], eos: str | None = None, bos: str | None = None, **named: str) -> None:
    """Add special `tokens` (and `named` ones, e.g. `image_token="<image>"`, readable as `tokenizer.image_token`);
    make `eos` / `bos` the tokenizer's eos / bos token."""
    extra = [t for t in [*tokens, *named.values(), *(x for x in (eos, bos) if x)] if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if eos:
        tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    if named:  # transformers' hook for a multimodal tokenizer's named tokens; saved in tokenizer_config.json
        tokenizer._set_model_specific_special_tokens(named)


def _tiny_text_config(tokenizer, **overrides) -> dict:
    """Keyword arguments of a tiny decoder (the language half of a VLM) over `tokenizer`'s vocabulary."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
        **overrides,
    }


def _qwen_vl_tokens(tokenizer) -> dict[str, int]:
    """Add Qwen-VL's vision tokens to `tokenizer`; return the config's token-id fields."""
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
    )
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_vl_image_processor(patch_size: int):
    """Qwen-VL's PIL image processor at tiny sizes: 4 to 16 image tokens an image (2x2-merged patches)."""
    from transformers import Qwen2VLImageProcessorPil

    unit = 2 * patch_size
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit},
        patch_size=patch_size,
        merge_size=2,
    )


def _build_qwen2_vl(tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from .models.images_only_processors import ImagesOnlyQwen2VLProcessor

    tokens = _qwen_vl_tokens(tokenizer)
    processor = ImagesOnlyQwen2VLProcessor(
        image_processor=_qwen_vl_image_processor(14), tokenizer=tokenizer, chat_template=_QWEN_VL_TEMPLATE
    )
    text = _tiny_text_config(tokenizer, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_chans": 3,
    }
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    return Qwen2VLForConditionalGeneration(config), processor


def _build_qwen2_5_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .models.images_only_processors import ImagesOnlyQwen2_5_VLProcessor

    tokens = _qwen_vl_tokens(tokenizer)
    processor = ImagesOnlyQwen2_5_VLProcessor(
        image_processor=_qwen_vl_image_processor(14), tokenizer=tokenizer, chat_template=_QWEN_VL_TEMPLATE
    )
    text = _tiny_text_config(tokenizer, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
    # Window attention in block 0 (over 56-pixel windows: 2x2 merged units), full attention in block 1.
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_qwen3_vl(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .models.images_only_processors import ImagesOnlyQwen3VLProcessor

    tokens = _qwen_vl_tokens(tokenizer)
    processor = ImagesOnlyQwen3VLProcessor(
        image_processor=_qwen_vl_image_processor(16), tokenizer=tokenizer, chat_template=_QWEN_VL_TEMPLATE
    )
    text = _tiny_text_config(
        tokenizer,
        head_dim=8,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )
    # Deepstack features from block 0 feed the first decoder layer; 8x8 learned position grid.
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    return Qwen3VLForConditionalGeneration(config), processor


def _build_llava(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # 32x32 crops in 8-pixel patches: 16 image tokens an image (the CLS feature is dropped, as in LLaVA-1.5).
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 32,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **_tiny_text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_qwen3_5(tokenizer, template: str = _QWEN_VL_TEMPLATE, moe: bool = False):
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )

    from .models.images_only_processors import ImagesOnlyQwen3VLProcessor

    tokens = _qwen_vl_tokens(tokenizer)  # Qwen3.5 uses Qwen3-VL's processor
    processor = ImagesOnlyQwen3VLProcessor(
        image_processor=_qwen_vl_image_processor(16), tokenizer=tokenizer, chat_template=template
    )
    # One gated-delta-net (linear attention) layer, then one full-attention layer.
    text = _tiny_text_config(
        tokenizer,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )
    if moe:  # 4 experts, 2 a token, plus the shared expert
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
        del text["intermediate_size"]
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
    }
    config_class, model_class = (
        (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
        if moe
        else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    )
    config = config_class(text_config=text, vision_config=vision, **tokens)
    return model_class(config), processor


def _clip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    """A 2-layer CLIP vision tower, hidden size 32."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": 32,
    }


def _siglip_vision(image_size: int = 32, patch_size: int = 8, **extra) -> dict:
    """A 2-layer SigLIP vision tower, hidden size 32."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        **extra,
    }


def _build_llava_next(tokenizer):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    _add_tokens(tokenizer, ["<image>"])
    # Any-resolution tiling of 32x32 crops (8-pixel patches): the base view's 16 tokens plus each tile's, with a
    # learned newline token closing every row of tile features.
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_NEXT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "qwen2", **_tiny_text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _idefics_tokens(tokenizer) -> None:
    """Idefics' image tokens, the `<row_i_col_j>` / `<global-img>` tile tags, and `<end_of_utterance>` as eos."""
    tags = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)] + ["<global-img>"]
    _add_tokens(tokenizer, ["<fake_token_around_image>", "<image>", *tags], eos="<end_of_utterance>")


def _build_idefics2(tokenizer):
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessorPil,
        Idefics2Processor,
    )

    _idefics_tokens(tokenizer)
    # Images resized to 32-64 pixels a side (8-pixel patches), resampled by the perceiver into 4 latents each.
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 32, "longest_edge": 64}, do_image_splitting=False
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=_IDEFICS_TEMPLATE.replace("{{- prefix }}", ""),
    )
    config = Idefics2Config(
        vision_config=_siglip_vision(image_size=64),
        perceiver_config={
            "hidden_size": 32,
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
        text_config={"model_type": "qwen2", **_tiny_text_config(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return Idefics2ForConditionalGeneration(config), processor


def _idefics3_image_kwargs() -> dict:
    """Idefics3 / SmolVLM tiling at tiny sizes: longest side 64, cut into 32x32 tiles plus a 32x32 global view."""
    return {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "do_image_splitting": True}


def _build_idefics3(tokenizer):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    _idefics_tokens(tokenizer)
    # 32x32 tiles in 8-pixel patches, pixel-shuffled 2x2: 4 image tokens a tile.
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**_idefics3_image_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=_IDEFICS_TEMPLATE.replace("{{- prefix }}", "{{- '<|im_start|>' }}"),
    )
    config = Idefics3Config(
        vision_config=_siglip_vision(),
        text_config={"model_type": "qwen2", **_tiny_text_config(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _build_smolvlm(tokenizer):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    from .models.images_only_processors import ImagesOnlySmolVLMProcessor

    _idefics_tokens(tokenizer)
    processor = ImagesOnlySmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(**_idefics3_image_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=_IDEFICS_TEMPLATE.replace("{{- prefix }}", "{{- '<|im_start|>' }}"),
    )
    config = SmolVLMConfig(
        vision_config=_siglip_vision(),
        text_config={"model_type": "qwen2", **_tiny_text_config(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return SmolVLMForConditionalGeneration(config), processor


def _gemma_text_config(tokenizer, **overrides) -> dict:
    """A tiny Gemma decoder: head dim 8, one sliding-window and one global layer, embeddings tied to the head."""
    return _tiny_text_config(
        tokenizer,
        head_dim=8,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        **overrides,
    )


def _build_gemma3(tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    _add_tokens(
        tokenizer,
        ["<start_of_turn>"],
        eos="<end_of_turn>",
        bos="<bos>",
        boi_token="<start_of_image>",
        image_token="<image_soft_token>",
        eoi_token="<end_of_image>",
    )
    # 32x32 images in 8-pixel patches, average-pooled 2x2: 4 image tokens an image.
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=_GEMMA3_TEMPLATE,
    )
    text = _gemma_text_config(
        tokenizer,
        model_type="gemma3_text",
        query_pre_attn_scalar=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip_vision(),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=True,
    )
    return Gemma3ForConditionalGeneration(config), processor


def _build_gemma4(tokenizer):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil

    from .models.images_only_processors import ImagesOnlyGemma4Processor

    _add_tokens(
        tokenizer,
        ["<start_of_turn>", "<|video|>"],
        eos="<end_of_turn>",
        bos="<bos>",
        boi_token="<start_of_image>",
        image_token="<image_soft_token>",
        eoi_token="<end_of_image>",
        audio_token="<audio_soft_token>",  # Gemma4Processor checks the audio tokens exist even without audio
        boa_token="<start_of_audio>",
        eoa_token="<end_of_audio>",
    )
    # Images resized to 630 4-pixel patches, pooled 3x3: 70 image tokens an image (Gemma 4's smallest budget).
    processor = ImagesOnlyGemma4Processor(
        image_processor=Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3),
        tokenizer=tokenizer,
        image_seq_length=70,
        chat_template=_GEMMA3_TEMPLATE.replace("'<start_of_image>'", "'<image_soft_token>'"),
    )
    # A sliding and a global layer (both head dim 8), per-layer input embeddings of width 8, no audio tower.
    text = _gemma_text_config(
        tokenizer,
        global_head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=8,
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "patch_size": 4,
        "pooling_kernel_size": 3,
        "position_embedding_size": 64,
    }
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        tie_word_embeddings=True,
    )
    return Gemma4ForConditionalGeneration(config), processor


def _build_paligemma(tokenizer):
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    _add_tokens(tokenizer, [], eos="<eos>", bos="<bos>", image_token="<image>")
    # 32x32 images in 8-pixel patches: 16 image tokens an image.
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_PALIGEMMA_TEMPLATE
    )
    text = _gemma_text_config(tokenizer, model_type="gemma")
    config = PaliGemmaConfig(
        vision_config=_siglip_vision(projection_dim=32),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )
    return PaliGemmaForConditionalGeneration(config), processor


VLM_BUILDERS = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "qwen3_5": _build_qwen3_5,
    "qwen3_5_think": functools.partial(_build_qwen3_5, template=_QWEN_THINK_TEMPLATE),
    "qwen3_5_moe": functools.partial(_build_qwen3_5, moe=True),
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "idefics2": _build_idefics2,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "gemma3": _build_gemma3,
    "gemma4": _build_gemma4,
    "paligemma": _build_paligemma,
}

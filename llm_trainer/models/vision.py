"""Vision-language model helpers: recognising a VLM, freezing its vision tower, finding its language model, and
loading its processor (with an images-only route where a family's video processor cannot be built).

Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, SmolVLM and Gemma 4 processors hold a video processor, and transformers'
video processors need torchvision (SmolVLM's also `num2words`; Gemma 4's processor an audio feature extractor too).
Training on images uses neither, so where they cannot be built (CPU-only machines whose package index carries only
CUDA torchvision wheels) `load_processor` builds the same processor without them: the tokenizer, image processor,
chat template and image-token bookkeeping are the family's own classes. The processor saves under its family's class
name, so the checkpoint loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from torch import nn
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.utils import cached_file, is_num2words_available, is_torchvision_available

# Submodules (by attribute name) that hold a VLM's vision encoder or its multimodal projector, across families:
# Qwen-VL `visual`; LLaVA / LLaVA-Next / Gemma 3 / PaliGemma `vision_tower` + `multi_modal_projector` (LLaVA-Next's
# learned `image_newline` too); Idefics2 / Idefics3 / SmolVLM `vision_model` + `connector`; Gemma 4 `vision_tower` +
# `embed_vision`; others `mm_projector`.
VISION_PARTS = (
    "visual",
    "vision_tower",
    "vision_model",
    "multi_modal_projector",
    "connector",
    "mm_projector",
    "embed_vision",
)
VISION_PARAMETERS = ("image_newline",)

# Attribute names of the decoder inside a VLM, tried in order on the model and on its `.model`.
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")


def unwrap_model(model: Any) -> Any:
    """The model under PEFT, DDP / FSDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def is_vision_model(model_or_config: Any) -> bool:
    """Whether a model (possibly PEFT / DDP / compile wrapped) or its config is a vision-language model.

    True when the config carries a `vision_config` (every transformers VLM family does); False for `None`.
    """
    if model_or_config is None:
        return False
    model = unwrap_model(model_or_config)
    config = getattr(model, "config", model)
    return getattr(config, "vision_config", None) is not None


def vision_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of a VLM's vision encoder and multimodal projector (PEFT adapters on them included)."""
    named = []
    for name, param in unwrap_model(model).named_parameters():
        parts = name.split(".")
        if any(part in VISION_PARTS for part in parts[:-1]) or parts[-1] in VISION_PARAMETERS:
            named.append((name, param))
    return named


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients through the vision encoder and its multimodal projector; return how many parameters froze.

    Raises `ValueError` on a text-only model, or on a VLM whose vision modules are not under a known name.
    """
    if not is_vision_model(model):
        raise ValueError(
            f"freeze_vision_tower=True needs a vision-language model, but {type(unwrap_model(model)).__name__} has "
            "no `vision_config`. Set freeze_vision_tower=False for a text-only model."
        )
    named = vision_parameters(model)
    if not named:
        raise ValueError(
            f"freeze_vision_tower: found no vision encoder or projector in {type(unwrap_model(model)).__name__} "
            f"(looked for submodules named {', '.join(VISION_PARTS)}). Freeze it yourself with "
            "`module.requires_grad_(False)` and set freeze_vision_tower=False."
        )
    count = 0
    for _, param in named:
        param.requires_grad_(False)
        count += getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter is empty here
    return count


def allow_unused_vision_parameters(args: Any, model: Any) -> None:
    """A vision-language policy: let DDP look for unused parameters (a batch without images leaves the vision tower
    without gradients), as TRL sets it, unless the user chose or reentrant checkpointing (which cannot run with it)."""
    reentrant = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if is_vision_model(model) and args.ddp_find_unused_parameters is None and not reentrant:
        args.ddp_find_unused_parameters = True


def language_model(model: nn.Module) -> nn.Module:
    """The decoder (text backbone, without the LM head) inside a VLM; a text-only causal LM's own backbone."""
    base = unwrap_model(model)
    for holder in (base, getattr(base, "model", None)):
        if holder is None:
            continue
        for name in LANGUAGE_MODEL_NAMES:
            inner = getattr(holder, name, None)
            if isinstance(inner, nn.Module):
                return inner
    if is_vision_model(base):
        raise ValueError(f"Cannot find the language model inside {type(base).__name__}.")
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    return backbone if isinstance(backbone, nn.Module) else base


# The processor classes `images_only_processors` has an images-only twin of.
IMAGES_ONLY_FAMILIES = (
    "Qwen2VLProcessor",
    "Qwen2_5_VLProcessor",
    "Qwen3VLProcessor",
    "SmolVLMProcessor",
    "Gemma4Processor",
)


def _processor_config(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The first of a model's processor / preprocessor / tokenizer configs that names a `processor_class` (a local
    folder's, or a Hub repository's through the cache); {} when none does or none can be fetched."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if os.path.isdir(name_or_path):
            file = os.path.join(name_or_path, name)
            file = file if os.path.isfile(file) else None
        else:
            try:
                file = cached_file(
                    str(name_or_path),
                    name,
                    **hub_kwargs,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                )
            except OSError:  # not a repository, gated, offline: AutoProcessor reports it
                return {}
        if file is not None:
            with open(file) as f:
                config = json.load(f)
            if config.get("processor_class"):
                return config
    return {}


def _images_only_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """The images-only processor of a Qwen-VL / SmolVLM / Gemma 4 model whose video processor (or audio feature
    extractor) cannot be built here; None for other models, or where it can."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    config = _processor_config(name_or_path, **hub)
    name = config.get("processor_class") or ""
    if name not in IMAGES_ONLY_FAMILIES:
        return None
    from .images_only_processors import IMAGES_ONLY_PROCESSORS, video_processor_available

    cls = IMAGES_ONLY_PROCESSORS[name]
    if video_processor_available(name):
        return None
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    accepted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in config.items() if k in accepted and k not in ("image_processor", "tokenizer")}
    extra.setdefault("chat_template", getattr(tokenizer, "chat_template", None))
    return cls(image_processor=image_processor, tokenizer=tokenizer, **extra)


def load_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained`; a Qwen-VL, SmolVLM or Gemma 4 processor (local or from the Hub) loads
    images-only where its video processor cannot be built (no torchvision)."""
    if not (is_torchvision_available() and is_num2words_available()):
        if os.path.isdir(name_or_path):
            processor = _images_only_processor(name_or_path, **kwargs)
            if processor is not None:
                return processor
        else:  # a Hub id: look at its configs only when AutoProcessor cannot build it
            try:
                return AutoProcessor.from_pretrained(name_or_path, **kwargs)
            except (OSError, ImportError, ValueError):
                processor = _images_only_processor(name_or_path, **kwargs)
                if processor is None:
                    raise
                return processor
    return AutoProcessor.from_pretrained(name_or_path, **kwargs)


def load_checkpoint_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load the weights a `save_pretrained` folder holds into the VLM `model`, through transformers' key conversions.

    transformers saves a VLM under its checkpoint key names (`model.layers...` for the module
    `model.language_model.layers...`), which only `from_pretrained` maps back. `Trainer`'s resume reads the file with
    a plain non-strict `load_state_dict`, so it would match none of the keys and silently keep the current weights;
    this reads the folder with `from_pretrained` and copies every tensor, strictly.
    """
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(folder, config=model.config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)

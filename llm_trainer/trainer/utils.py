"""TRL's public trainer helpers at TRL's path (`trl.trainer.utils`); each delegates to where it lives."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.collators import pad
from ..data.sampling import RepeatSampler, repeat_iterable_dataset
from ..kernels import entropy_from_logits, selective_log_softmax
from ..losses.policy_gradient import nanmax, nanmin, nanstd

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from .model_config import ModelConfig

__all__ = [
    "RepeatSampler",
    "disable_dropout_in_model",
    "entropy_from_logits",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
    "nanmax",
    "nanmin",
    "nanstd",
    "pad",
    "repeat_iterable_dataset",
    "selective_log_softmax",
]


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Set the probability of every dropout layer in `model` to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def get_quantization_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes config `model_args` asks for (`load_in_4bit` / `load_in_8bit`), else None.

    4-bit computes in `model_args.dtype`, the dtype the rest of the model is loaded in.
    """
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=model_args.dtype,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def get_kbit_device_map() -> dict[str, int] | None:
    """Device map putting a quantized model whole on this process's accelerator; None on CPU (older TRL's helper)."""
    from accelerate import PartialState

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return {"": PartialState().local_process_index}
    return None


def get_peft_config(model_args: ModelConfig) -> LoraConfig | None:
    """A `peft.LoraConfig` built from the `lora_*` fields of `model_args`, or None unless `use_peft` is set."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError('`use_peft=True` needs the peft library: pip install "llm-trainer[peft]"') from error
    extra = {}
    if model_args.lora_target_parameters is not None:  # a `LoraConfig` argument only since peft 0.17
        extra["target_parameters"] = model_args.lora_target_parameters
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        bias="none",
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **extra,
    )

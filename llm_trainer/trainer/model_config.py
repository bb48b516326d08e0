"""`ModelConfig`: which model a script trains, how it is loaded, and its LoRA / quantization options (TRL 1.16's)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import option

DTYPES = ("auto", "bfloat16", "float16", "float32")
BNB_4BIT_QUANT_TYPES = ("fp4", "nf4")


@dataclass
class ModelConfig:
    """Model arguments of TRL's example scripts; `TrlParser` turns every field into a command-line flag.

    Field names and defaults are TRL 1.16's. `get_peft_config` builds a `peft.LoraConfig` from the `lora_*` fields
    (when `use_peft`), and `get_quantization_config` a `BitsAndBytesConfig` from `load_in_4bit` / `load_in_8bit`.
    A one-element `lora_target_modules` list becomes that string, so `--lora_target_modules all-linear` means PEFT's
    "all-linear" shortcut rather than a module named so.
    """

    model_name_or_path: str | None = option(None, "Model to train: a Hub id or a local folder.")
    model_revision: str = option("main", "Model version to load: a branch name, a tag or a commit id.")
    dtype: str | None = option(
        "float32", "dtype to load the model weights in; 'auto' keeps the checkpoint's.", choices=list(DTYPES)
    )
    attn_implementation: str | None = option(
        None, "Attention implementation, e.g. 'sdpa', 'eager' or 'flash_attention_2' (installed apart)."
    )
    use_peft: bool = option(False, "Train a LoRA adapter instead of the full model.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (the adapter is scaled by alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = option(
        None, "Modules to adapt (names, or 'all-linear'); None uses PEFT's default."
    )
    lora_target_parameters: list[str] | None = option(None, "Parameters to adapt directly (e.g. MoE expert weights).")
    lora_modules_to_save: list[str] | None = option(None, "Modules trained in full and saved alongside the adapter.")
    lora_task_type: str = option("CAUSAL_LM", "PEFT task type: 'CAUSAL_LM', or 'SEQ_CLS' for reward models.")
    use_rslora: bool = option(False, "Rank-stabilized LoRA: scale the adapter by alpha / sqrt(r) instead of r.")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA): LoRA learns the direction, a vector the magnitude.")
    load_in_8bit: bool = option(False, "Load the base model in 8 bits (bitsandbytes); for LoRA training.")
    load_in_4bit: bool = option(False, "Load the base model in 4 bits (bitsandbytes); for LoRA training.")
    bnb_4bit_quant_type: str = option("nf4", "4-bit quantization data type.", choices=list(BNB_4BIT_QUANT_TYPES))
    use_bnb_nested_quant: bool = option(False, "Also quantize the 4-bit quantization constants (double quantization).")
    bnb_4bit_quant_storage: str | None = option(
        None, "dtype the 4-bit weights are stored in; None keeps bitsandbytes' uint8."
    )

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError(
                "`load_in_8bit` and `load_in_4bit` are both set: you can't use 8 bit and 4 bit precision at the same "
                "time; choose one quantization."
            )
        if isinstance(self.dtype, str) and self.dtype not in DTYPES:
            raise ValueError(f"Invalid `dtype` {self.dtype!r}: use one of {', '.join(map(repr, DTYPES))}.")
        if self.bnb_4bit_quant_type not in BNB_4BIT_QUANT_TYPES:
            raise ValueError(f"Invalid `bnb_4bit_quant_type` {self.bnb_4bit_quant_type!r}: use 'fp4' or 'nf4'.")
        if isinstance(self.lora_target_modules, (list, tuple)) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]

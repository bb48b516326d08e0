"""Defaults shared by every llm_trainer config (TRL's `_BaseConfig`)."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available


@dataclass
class BaseConfig(TrainingArguments):
    """`TrainingArguments` with the defaults TRL's trainers share.

    Differences from `TrainingArguments`: `logging_steps=10`, `gradient_checkpointing=True`, and `bf16=None`, which
    resolves to `not fp16` where bf16 can run (a bf16-capable accelerator, or `use_cpu=True`) and to False
    elsewhere, where TRL's config raises instead. Adds the model-loading fields every trainer reads (`model_init_kwargs`,
    `trust_remote_code`).
    """

    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X update steps: an integer, or a float in [0, 1) read as a ratio of total steps."
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass to save memory, at about 20%% more compute."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 (mixed) precision. Unset means `True` unless `fp16` is set."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments for the learning-rate scheduler, e.g. {'num_cycles': 1}."},
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "Patch the model's layers with Liger's Triton kernels (deprecated in TRL; kept for scripts)."
        },
    )
    torch_empty_cache_steps: int | None = field(
        default=None,
        metadata={"help": "Call `torch.<device>.empty_cache()` every N steps (slower, lowers peak memory)."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the model is given as a name or path. `dtype` "
            "defaults to float32."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom model code from the model's repository when loading by name or path."},
    )

    def __post_init__(self):
        check_number(
            self, "learning_rate", 0, "A negative rate climbs the loss instead of descending it; use e.g. 1e-5."
        )
        check_number(
            self,
            "gradient_accumulation_steps",
            1,
            "It is the number of micro-batches per optimizer step: use 1 for no accumulation.",
        )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            check_number(self, name, 1, "Use a batch size of 1 or more.")
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _bf16_available(self.use_cpu)
        if isinstance(self.model_init_kwargs, str):  # from the CLI
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        super().__post_init__()


def check_number(config: Any, name: str, minimum: float, fix: str, *, exclusive: bool = False) -> None:
    """Raise a `ValueError` naming the field `name` when its value is below `minimum` (or equal to it, when
    `exclusive`); None (and anything not a number, left to the code that reads it) passes. `fix` says what to set
    instead."""
    value = getattr(config, name)
    if not isinstance(value, numbers.Real) or value > minimum or (value == minimum and not exclusive):
        return
    raise ValueError(f"`{name}={value!r}` is invalid: it must be {'>' if exclusive else '>='} {minimum}. {fix}")


def _bf16_available(use_cpu: bool) -> bool:
    """Whether `TrainingArguments` accepts `bf16=True` here (the same test it validates with)."""
    return use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()


def resolve_pad_to_multiple_of(value: int | str | None, device_type: str) -> int | None:
    """`pad_to_multiple_of` as an int or None: "auto" is 128 on Neuron (one compilation per shape) and None elsewhere;
    strings from the CLI ("8", "none") are parsed."""
    if value == "auto":
        return 128 if device_type == "neuron" else None
    if isinstance(value, str):
        return None if value.lower() in ("none", "null") else int(value)
    return value

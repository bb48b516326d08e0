"""Configuration for `RewardTrainer`: the fields and defaults of TRL 1.16's `RewardConfig`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from .base_config import BaseConfig, resolve_pad_to_multiple_of


@dataclass
class RewardConfig(BaseConfig):
    """Configuration for [`RewardTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-4`, `max_length=1024`, `disable_dropout=True`), so a
    TRL script keeps working after swapping the import.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial learning rate for AdamW."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForSequenceClassification.from_pretrained` when the model is "
            "given as a name or path (`num_labels` is always 1). `dtype` defaults to float32; `revision` is also used "
            "for the tokenizer."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A `.jinja` file, or a tokenizer path whose chat template to use."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the model to 0."})

    # Dataset preparation
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Token appended to plain-text sequences; defaults to the tokenizer's eos token."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokenized length: pairs whose chosen or rejected sequence is longer are dropped (not "
            "truncated). None keeps every pair."
        },
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad sequence lengths to a multiple of this value; 'auto' means 128 on Neuron, else None."},
    )

    # Training
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the penalty mean((r_chosen + r_rejected)^2) that pulls rewards towards zero mean "
            "(Eisenstein et al., 2023, https://huggingface.co/papers/2312.09244). Recommended: 0.01."
        },
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload saved activations to CPU memory during the forward pass."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated. Set `tokenizer.pad_token` and pass it as `processing_class` instead."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        if self.pad_token is not None:
            warnings.warn(
                "`pad_token` is deprecated: set `tokenizer.pad_token` and pass it as `processing_class` instead.",
                FutureWarning,
                stacklevel=3,
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (keep every pair), got {self.max_length}."
            )
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                f"`center_rewards_coefficient` must be >= 0 (0.01 is a good start) or None, got "
                f"{self.center_rewards_coefficient}."
            )

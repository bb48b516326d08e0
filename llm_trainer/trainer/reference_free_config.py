"""The fields `ORPOConfig` and `CPOConfig` share (TRL 1.16 `trl.experimental.orpo` / `trl.experimental.cpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base_config import BaseConfig


@dataclass
class ReferenceFreeConfig(BaseConfig):
    """Base of the configs of the preference trainers without a reference model (ORPO, CPO / SimPO / AlphaPO).

    Differences from `TrainingArguments` besides `BaseConfig`'s: `learning_rate=1e-6`. A model given by name loads
    in the checkpoint's own dtype (`dtype="auto"`), as TRL's experimental trainers do.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate for AdamW."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the model is given as a name or "
            "path. `dtype` defaults to 'auto' (the checkpoint's dtype); `revision` is also used for the tokenizer."
        },
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum length of prompt + completion: completions are cut to fit, prompts are kept whole. None "
            "means 512, with a warning (as in TRL)."
        },
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Maximum completion length of encoder-decoder models (which llm_trainer does not train)."},
    )
    beta: float = field(default=0.1, metadata={"help": "Weight of the preference term."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the model to 0."})
    generate_during_eval: bool = field(
        default=False,
        metadata={"help": "Sample completions for a batch of eval prompts and log them to W&B or Comet at each eval."},
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={"help": "Whether the model is an encoder-decoder (only read with `model_init`)."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (512, as in TRL), got {self.max_length}."
            )
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0 (0.1 is TRL's default), got {self.beta}.")

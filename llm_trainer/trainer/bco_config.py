"""Configuration for `BCOTrainer`: the fields and defaults of TRL 1.13's `experimental.bco.BCOConfig` (the last
release that shipped BCO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import BaseConfig


@dataclass
class BCOConfig(BaseConfig):
    """Configuration for [`BCOTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.13's (`learning_rate=5e-7`, `beta=0.1`, `max_length=1024`,
    `prompt_sample_size=1024`, density ratio clamped to [0.5, 10]). `train_sampling_strategy` defaults to
    'sequential', the order TRL's BCOTrainer always used.
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate for AdamW."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Order of the training examples ('sequential', as TRL's BCOTrainer; 'random'; 'group_by_length').",
            "choices": ["random", "sequential", "group_by_length"],
        },
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + completion; longer sequences lose their end, and examples whose "
            "prompt alone fills it are dropped. None disables truncation."
        },
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Maximum completion length of encoder-decoder models (unused: decoder-only models only)."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the tie to the reference model: higher β means less deviation from it."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the model and the reference model."}
    )
    generate_during_eval: bool = field(
        default=False,
        metadata={"help": "Log model and reference generations to W&B / Comet during evaluation (not supported)."},
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={
            "help": "Whether a `model_init` model is encoder-decoder (not supported: decoder-only models only)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the whole dataset before training, so no reference model is "
            "kept in memory."
        },
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    prompt_sample_size: int = field(
        default=1024,
        metadata={"help": "Prompts per label sampled to fit the UDM density-ratio classifier."},
    )
    min_density_ratio: float = field(
        default=0.5, metadata={"help": "Lower clamp of the UDM density ratio (the undesirable examples' weight)."}
    )
    max_density_ratio: float = field(
        default=10.0, metadata={"help": "Upper clamp of the UDM density ratio (the undesirable examples' weight)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"`max_length` must be a positive number of tokens or None (no truncation), got {self.max_length}."
            )
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive (e.g. the default 0.1), got {self.beta}.")
        if self.prompt_sample_size < 1:
            raise ValueError(
                f"`prompt_sample_size` must be a positive number of prompts, got {self.prompt_sample_size}."
            )
        if not 0 < self.min_density_ratio <= self.max_density_ratio:
            raise ValueError(
                "The density ratio clamp needs 0 < `min_density_ratio` <= `max_density_ratio`, got "
                f"{self.min_density_ratio} and {self.max_density_ratio}."
            )
        if self.generate_during_eval:
            raise ValueError(
                "`generate_during_eval=True` is not supported by llm_trainer's BCOTrainer; set it to False and "
                "generate from the saved checkpoints instead."
            )
        if self.is_encoder_decoder:
            raise ValueError(
                "Encoder-decoder models are not supported by BCOTrainer; use a decoder-only causal LM and leave "
                "`is_encoder_decoder` unset."
            )

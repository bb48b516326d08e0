"""Configuration for `BCOTrainer`: the fields and defaults of TRL 1.13's `experimental.bco.BCOConfig` (the last
release that shipped BCO)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import ENCODER_DECODER_ONLY, OfflineConfig, option, shared


@dataclass
class BCOConfig(OfflineConfig):
    """Configuration for [`BCOTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.13's (`learning_rate=5e-7`, `beta=0.1`, `max_length=1024`,
    `prompt_sample_size=1024`, density ratio clamped to [0.5, 10]). `train_sampling_strategy` defaults to
    'sequential', the order TRL's BCOTrainer always used. Longer sequences than `max_length` lose their end, and
    examples whose prompt alone fills it are dropped.
    """

    _inert_fields = {"max_completion_length": ENCODER_DECODER_ONLY}

    learning_rate: float = shared("learning_rate", 5e-7)
    train_sampling_strategy: str = shared("train_sampling_strategy", "sequential")
    max_completion_length: int | None = shared("max_completion_length", None)
    packed_forward: bool | None = shared("packed_forward", None)
    beta: float = option(0.1, "Strength of the tie to the reference model: higher β means less deviation from it.")
    disable_dropout: bool = shared("disable_dropout", True)
    generate_during_eval: bool = shared("generate_during_eval", False)
    is_encoder_decoder: bool | None = shared("is_encoder_decoder", None)
    precompute_ref_log_probs: bool = shared("precompute_ref_log_probs", False)
    prompt_sample_size: int = option(1024, "Prompts per label sampled to fit the UDM density-ratio classifier.")
    min_density_ratio: float = option(0.5, "Lower clamp of the UDM density ratio (the undesirable examples' weight).")
    max_density_ratio: float = option(10.0, "Upper clamp of the UDM density ratio (the undesirable examples' weight).")

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
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

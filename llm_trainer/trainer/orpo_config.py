"""Configuration for `ORPOTrainer`: the fields and defaults of TRL 1.16's `trl.experimental.orpo.ORPOConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import option
from .reference_free_config import ReferenceFreeConfig


@dataclass
class ORPOConfig(ReferenceFreeConfig):
    """Configuration for [`ORPOTrainer`] (Hong et al., 2024, https://huggingface.co/papers/2403.07691).

    Field names and defaults are TRL 1.16's: `learning_rate=1e-6`, `beta=0.1` (the paper's λ), `max_length=1024`,
    `disable_dropout=True`; every other argument is a `transformers.TrainingArguments` field.
    """

    padding_value: int | None = option(None, "Token id to pad `input_ids` with; None uses the tokenizer's pad token.")

"""Configuration for `RewardTrainer`: the fields and defaults of TRL 1.16's `RewardConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import OfflineConfig, option, resolve_pad_to_multiple_of, shared


@dataclass
class RewardConfig(OfflineConfig):
    """Configuration for [`RewardTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-4`, `max_length=1024`, `disable_dropout=True`), so a
    TRL script keeps working after swapping the import. A model given by name loads with
    `AutoModelForSequenceClassification` (`num_labels=1`), and its `revision` also picks the tokenizer. Pairs whose chosen or rejected sequence is longer than
    `max_length` are dropped, not truncated.
    """

    _max_length_none = "keep every pair"

    learning_rate: float = shared("learning_rate", 1e-4)
    chat_template_path: str | None = shared("chat_template_path", None)
    disable_dropout: bool = shared("disable_dropout", True)

    # Dataset preparation
    eos_token: str | None = shared("eos_token", None)
    pad_to_multiple_of: int | str | None = shared("pad_to_multiple_of", "auto")
    packed_forward: bool | None = shared("packed_forward", None)

    # Training
    center_rewards_coefficient: float | None = option(
        None,
        "Weight of the penalty mean((r_chosen + r_rejected)^2) that pulls rewards towards zero mean (Eisenstein et "
        "al., 2023, https://huggingface.co/papers/2312.09244). Recommended: 0.01.",
    )
    activation_offloading: bool = shared("activation_offloading", False)
    pad_token: str | None = shared("pad_token", None)

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                f"`center_rewards_coefficient` must be >= 0 (0.01 is a good start) or None, got "
                f"{self.center_rewards_coefficient}."
            )

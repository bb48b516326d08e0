"""Configuration for `KTOTrainer`: the fields and defaults of TRL 1.16's `KTOConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import KTO_LOSS_TYPES
from .base_config import check_choices, option, shared
from .reference_config import ReferenceModelConfig


@dataclass
class KTOConfig(ReferenceModelConfig):
    """Configuration for [`KTOTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.16's (`learning_rate=1e-6`, `beta=0.1`, `loss_type="kto"`,
    `train_sampling_strategy="sequential"`, ...), so a TRL script keeps working after swapping the import. The 'kto'
    loss needs `train_sampling_strategy='sequential'`: each example's KL completion is its neighbour's within a
    fixed-order batch.
    """

    learning_rate: float = shared("learning_rate", 1e-6)
    train_sampling_strategy: str = shared("train_sampling_strategy", "sequential")
    freeze_vision_tower: bool = shared("freeze_vision_tower", False)

    # Loss
    loss_type: str = option(
        "kto",
        "'kto' (KTO paper, Eq. 7, with the KL reference point) or 'apo_zero_unpaired' (unpaired APO-zero).",
        choices=list(KTO_LOSS_TYPES),
    )
    beta: float = option(0.1, "Strength of the tie to the reference model: higher β means less deviation from it.")
    desirable_weight: float = option(
        1.0, "Weight of the desirable examples' losses, to offset unequal desirable/undesirable counts."
    )
    undesirable_weight: float = option(
        1.0, "Weight of the undesirable examples' losses, to offset unequal desirable/undesirable counts."
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        check_choices(self, "loss_type")
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive (e.g. the default 0.1), got {self.beta}.")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                "`desirable_weight` and `undesirable_weight` must be non-negative, got "
                f"{self.desirable_weight} and {self.undesirable_weight}."
            )
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError(
                "`desirable_weight` and `undesirable_weight` are both 0, so the loss is 0 and training learns nothing. "
                "Set at least one above 0 (both default to 1.0)."
            )
        if self.loss_type != "apo_zero_unpaired":
            if self.train_sampling_strategy != "sequential":
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` estimates the KL term from each example's neighbour in a "
                    "fixed-order batch, so it needs `train_sampling_strategy='sequential'`, got "
                    f"{self.train_sampling_strategy!r}. Shuffle the dataset beforehand instead."
                )
            if self.per_device_train_batch_size <= 1:
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` pairs each prompt with another example's completion within the "
                    "batch to estimate the KL term, so `per_device_train_batch_size` must be at least 2, got "
                    f"{self.per_device_train_batch_size}."
                )

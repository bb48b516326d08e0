"""Configuration for `PRMTrainer`: the fields and defaults of TRL 1.13's `experimental.prm.PRMConfig` (the last
release that shipped PRM)."""

from __future__ import annotations

from dataclasses import dataclass

from .base_config import OfflineConfig, option, shared


@dataclass
class PRMConfig(OfflineConfig):
    """Configuration for [`PRMTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.13's (`learning_rate=1e-5`, `max_length=1024`, `step_separator="\\n"`,
    `train_on_last_step_only=False`). Prompt + steps longer than `max_length` lose their end.
    """

    learning_rate: float = shared("learning_rate", 1e-5)
    max_completion_length: int | None = option(
        None, "Maximum tokens of the steps (with their separators); None: no truncation."
    )
    disable_dropout: bool = shared("disable_dropout", True)
    step_separator: str = option("\n", "Text appended to each reasoning step; the step's label sits on its end.")
    train_on_last_step_only: bool = option(
        False, "Train on the last step's label only (evaluation still scores every step)."
    )

    def __post_init__(self):
        super().__post_init__()
        value = self.max_completion_length
        if value is not None and value < 1:
            raise ValueError(f"`max_completion_length` must be a positive number of tokens or None, got {value}.")
        if not self.step_separator:
            raise ValueError(
                "`step_separator` must be non-empty: each step's label is placed on its last separator token. Use "
                "e.g. '\\n'."
            )

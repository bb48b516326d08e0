"""Configuration for `PRMTrainer`: the fields and defaults of TRL 1.13's `experimental.prm.PRMConfig` (the last
release that shipped PRM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import BaseConfig


@dataclass
class PRMConfig(BaseConfig):
    """Configuration for [`PRMTrainer`]; every other argument is a `transformers.TrainingArguments` field.

    Field names and defaults are TRL 1.13's (`learning_rate=1e-5`, `max_length=1024`, `step_separator="\\n"`,
    `train_on_last_step_only=False`).
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate for AdamW."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokens of prompt + steps; longer sequences lose their end. None: no truncation."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens of the steps (with their separators); None: no truncation."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    step_separator: str = field(
        default="\n", metadata={"help": "Text appended to each reasoning step; the step's label sits on its end."}
    )
    train_on_last_step_only: bool = field(
        default=False,
        metadata={"help": "Train on the last step's label only (evaluation still scores every step)."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive number of tokens or None (no truncation), got {value}.")
        if not self.step_separator:
            raise ValueError(
                "`step_separator` must be non-empty: each step's label is placed on its last separator token. Use "
                "e.g. '\\n'."
            )

"""`GKDConfig`: the fields of TRL 1.16's `trl.experimental.gkd.GKDConfig`, same names and defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .base_config import option
from .sft_config import SFTConfig


@dataclass
class GKDConfig(SFTConfig):
    """Configuration of `GKDTrainer`: generalized knowledge distillation on a conversational (`messages`) dataset.

    Each step trains on the dataset's last assistant turn, or, with probability `lmbda`, on a completion the student
    samples for the same prompt (else, with `seq_kd`, on one the teacher samples). `temperature` is the sampling
    temperature; the divergence is taken at temperature 1, as in TRL. The SFT fields that reshape batches
    (`packing`, `padding_free`, `assistant_only_loss`) are refused by the trainer.
    """

    _algorithm = "GKDTrainer"
    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    temperature: float = option(0.9, "Sampling temperature of the on-policy (and `seq_kd`) completions.")
    lmbda: float = option(
        0.5, "Probability that a step trains on completions the student samples (the on-policy fraction)."
    )
    beta: float = option(
        0.5,
        "Generalized JSD interpolation: 0.0 = forward KL(teacher || student), 0.5 = JSD, 1.0 = reverse KL(student || "
        "teacher).",
    )
    max_new_tokens: int = option(128, "Maximum number of tokens sampled per completion.")
    teacher_model_name_or_path: str | None = option(
        None, "Teacher loaded when the trainer is given no `teacher_model`."
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = option(
        None, "Keyword arguments for `from_pretrained` when loading the teacher by name."
    )
    disable_dropout: bool = option(True, "Disable dropout in the student.")
    seq_kd: bool = option(
        False, "Sequence-level KD: steps that are not on-policy train on completions the teacher samples."
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0.0, 1.0] (the on-policy fraction), got {self.lmbda}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"beta must be in [0.0, 1.0] (0 = forward KL, 0.5 = JSD, 1 = reverse KL), got {self.beta}."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (it is the sampling temperature), got {self.temperature}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")

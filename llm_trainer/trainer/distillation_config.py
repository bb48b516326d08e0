"""`DistillationConfig`: the fields of TRL 1.16's `DistillationConfig`, same names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base_config import option
from .online_config import OnPolicyConfig


@dataclass
class DistillationConfig(OnPolicyConfig):
    """Configuration of `DistillationTrainer`: on-policy knowledge distillation (the student samples the
    completions, and learns to match the teacher's next-token distribution on them).

    Differences from `TrainingArguments` (besides `BaseConfig`'s): `learning_rate=1e-6` and
    `remove_unused_columns=False`. The sampling, vLLM and logging fields are shared with `GRPOConfig`; `temperature`
    also scales both models' logits in the loss, and `disable_dropout` applies to the student. One generation batch
    serves one optimizer step.
    """

    _algorithm = "DistillationTrainer"
    _inert_fields = {"max_tool_calling_iterations": "DistillationTrainer does not call tools yet."}
    _VALID_DICT_FIELDS = OnPolicyConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    # Teacher
    teacher_model_name_or_path: str | None = option(
        None, "Teacher loaded when the trainer is given no `teacher_model`."
    )
    teacher_model_revision: str | None = option(None, "Revision (branch, tag or commit) of a teacher loaded by name.")
    teacher_model_init_kwargs: dict[str, Any] | str | None = option(
        None, "Keyword arguments for `from_pretrained` when loading the teacher by name."
    )

    # Loss
    beta: float = option(
        1.0,
        "Generalized JSD interpolation: 0.0 = forward KL(teacher || student), 0.5 = JSD, 1.0 = reverse KL(student || "
        "teacher). It selects the divergence; there is no reference-model penalty.",
    )
    max_tool_calling_iterations: int | None = option(None, "Maximum tool-calling turns when training an agent.")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"beta must be in [0.0, 1.0] (0 = forward KL, 0.5 = JSD, 1 = reverse KL), got {self.beta}."
            )
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be positive (it also scales the loss's logits), got {self.temperature}."
            )

    @property
    def steps_per_generation(self) -> int:
        """Micro-batches cut from one generation batch: one generation per optimizer step."""
        return self.gradient_accumulation_steps

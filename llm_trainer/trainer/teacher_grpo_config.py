"""Configuration for `TeacherGRPOTrainer`: `GRPOConfig` plus the student's generation limits and the prompt templates."""

from __future__ import annotations

import string
from dataclasses import dataclass

from .base_config import option
from .grpo_config import GRPOConfig

DEFAULT_ANSWER_TEMPLATE = "Solve the following problem and state the final answer.\n\nProblem: {problem}"
DEFAULT_PROBE_TEMPLATE = (
    "Problem: {problem}\n\nYour attempt: {attempt}\n\nBefore you get help, say in one or two sentences what you find "
    "hard or unclear about this problem."
)
DEFAULT_TEACHING_TEMPLATE = (
    "You are a teacher. A student is working on this problem:\n\n{problem}\n\nThe student says what they find "
    "hard:\n\n{probe}\n\nWrite a short, clear explanation that addresses this difficulty and helps the student solve "
    "the problem."
)
DEFAULT_TAUGHT_ANSWER_TEMPLATE = (
    "A teacher's explanation:\n\n{teaching}\n\nUse it to solve the following problem and state the final answer."
    "\n\nProblem: {problem}"
)

# template field -> (placeholders it must contain, placeholders it may contain)
TEMPLATE_FIELDS = {
    "answer_template": ({"problem"}, {"problem"}),
    "probe_template": ({"problem"}, {"problem", "attempt"}),
    "teaching_template": ({"problem", "probe"}, {"problem", "probe", "attempt"}),
    "taught_answer_template": ({"problem", "teaching"}, {"problem", "teaching", "probe"}),
}


@dataclass
class TeacherGRPOConfig(GRPOConfig):
    """Configuration for [`TeacherGRPOTrainer`]: GRPO on a teacher policy rewarded by a student's improvement.

    Every `GRPOConfig` field applies to the teacher: `max_completion_length` bounds the teaching, `num_generations`
    is the number of teachings sampled per problem. The fields below set how the student is prompted and how long it
    may write. Templates are `str.format` strings with the placeholders `{problem}` (the problem text), `{attempt}`
    (the student's answer without teaching), `{probe}` (the student's diagnostic probe) and `{teaching}` (the
    teacher's completion); each template checks here which of them it uses.
    """

    _algorithm = "Teacher GRPO"

    max_probe_tokens: int = option(64, "Most tokens the student writes in its diagnostic probe.")
    max_student_tokens: int = option(256, "Most tokens the student writes in each answer (with and without teaching).")
    student_temperature: float = option(
        0.0, "Sampling temperature of the student's answers and probes; 0 is greedy (a steadier reward)."
    )
    answer_template: str = option(
        DEFAULT_ANSWER_TEMPLATE, "The student's prompt to answer without teaching; placeholder {problem}."
    )
    probe_template: str = option(
        DEFAULT_PROBE_TEMPLATE,
        "The student's prompt to write a probe of what it finds hard; placeholders {problem} and, optionally, "
        "{attempt}.",
    )
    teaching_template: str = option(
        DEFAULT_TEACHING_TEMPLATE,
        "The teacher's prompt (what the policy is trained on); placeholders {problem}, {probe} and, optionally, "
        "{attempt}.",
    )
    taught_answer_template: str = option(
        DEFAULT_TAUGHT_ANSWER_TEMPLATE,
        "The student's prompt to answer with the teaching; placeholders {problem}, {teaching} and, optionally, "
        "{probe}.",
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_probe_tokens", "max_student_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.student_temperature < 0:
            raise ValueError(f"`student_temperature` must be >= 0 (0 is greedy), got {self.student_temperature}.")
        for name, (required, allowed) in TEMPLATE_FIELDS.items():
            check_template(name, getattr(self, name), required, allowed)


def check_template(name: str, template: str, required: set[str], allowed: set[str]) -> None:
    """Raise a clear error when `template` lacks a required placeholder or uses an unknown one."""
    try:
        used = {field_name for _, field_name, _, _ in string.Formatter().parse(template) if field_name is not None}
    except ValueError as err:
        raise ValueError(
            f"`{name}` is not a valid format string ({err}); write literal braces as '{{{{' and '}}}}'."
        ) from err
    missing, unknown = required - used, used - allowed
    if missing:
        raise ValueError(f"`{name}` must contain the placeholder(s) {sorted('{' + m + '}' for m in missing)}.")
    if unknown:
        raise ValueError(
            f"`{name}` uses unknown placeholder(s) {sorted('{' + u + '}' for u in unknown)}; it may use "
            f"{sorted('{' + a + '}' for a in allowed)}. Write literal braces as '{{{{' and '}}}}'."
        )

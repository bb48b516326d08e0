"""The reward of an adaptive teacher: how much its teaching improved a student's answer, with short teaching preferred
(used by `TeacherGRPOTrainer`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._utils import check_same_length


class AdaptiveTeachingReward:
    """Reward teaching by the student's improvement: `Δ = correct_with - correct_without`.

    - `Δ < 0` (the student got worse with the teaching): `-degradation_penalty_multiplier * |Δ|`;
    - otherwise: `Δ * (1 + efficiency_weight * 100 / (100 + teaching_tokens))`, so among teachings that help equally
      the shorter one earns more, and teaching that changes nothing earns 0.

    Correctness values are usually 0/1 (or `True`/`False`), or partial credit in [0, 1]; `None` skips the sample.

    Called as a reward function (the contract of `GRPOTrainer`), it reads the columns `correct_without`,
    `correct_with` and `teaching_tokens` that `TeacherGRPOTrainer`'s rollout adds; without `teaching_tokens` the
    teaching length is that of `completion_ids`. Logged as `rewards/adaptive_teaching_reward/*`.

    Args:
        degradation_penalty_multiplier: How hard making the student worse is punished; must be >= 0.
        efficiency_weight: Weight of the length bonus on improvements; must be >= 0 (0 ignores the length).

    Example:
        >>> reward = AdaptiveTeachingReward()
        >>> reward.score((0.0, 1.0), teaching_tokens=100), reward.score(-1.0, teaching_tokens=10)
        (1.5, -2.0)
    """

    __name__ = "adaptive_teaching_reward"

    def __init__(self, degradation_penalty_multiplier: float = 2.0, efficiency_weight: float = 1.0):
        for name, value in (
            ("degradation_penalty_multiplier", degradation_penalty_multiplier),
            ("efficiency_weight", efficiency_weight),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        self.degradation_penalty_multiplier = float(degradation_penalty_multiplier)
        self.efficiency_weight = float(efficiency_weight)

    def __repr__(self) -> str:
        return (
            f"AdaptiveTeachingReward(degradation_penalty_multiplier={self.degradation_penalty_multiplier}, "
            f"efficiency_weight={self.efficiency_weight})"
        )

    def score(self, delta: float | tuple[float, float], teaching_tokens: int) -> float:
        """The reward of one teaching: `delta` is `Δ`, or the pair `(correct_without, correct_with)`."""
        if isinstance(delta, tuple | list):
            if len(delta) != 2:
                raise ValueError(f"`delta` as a pair must be (correct_without, correct_with), got {delta!r}.")
            delta = float(delta[1]) - float(delta[0])
        delta = float(delta)
        if teaching_tokens < 0:
            raise ValueError(f"`teaching_tokens` must be >= 0, got {teaching_tokens}.")
        if delta < 0:
            return -self.degradation_penalty_multiplier * abs(delta)
        return delta * (1.0 + self.efficiency_weight * 100.0 / (100.0 + teaching_tokens))

    def __call__(
        self,
        completions: Sequence[Any],
        correct_without: Sequence[float | bool | None] | None = None,
        correct_with: Sequence[float | bool | None] | None = None,
        teaching_tokens: Sequence[int] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if correct_without is None or correct_with is None:
            raise ValueError(
                "AdaptiveTeachingReward needs the `correct_without` and `correct_with` columns (the student's "
                "correctness before and after the teaching); use it with `TeacherGRPOTrainer`, or add those columns."
            )
        if teaching_tokens is None:
            if completion_ids is None:
                raise ValueError(
                    "AdaptiveTeachingReward needs `teaching_tokens` or `completion_ids` to measure length."
                )
            teaching_tokens = [len(ids) for ids in completion_ids]
        for name, values in (
            ("correct_without", correct_without),
            ("correct_with", correct_with),
            ("teaching_tokens", teaching_tokens),
        ):
            check_same_length(name, values, completions)
        return [
            None if before is None or after is None else self.score((before, after), tokens)
            for before, after, tokens in zip(correct_without, correct_with, teaching_tokens)
        ]

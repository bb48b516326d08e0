"""Rewards computed from completion token ids: repeated n-grams and overlong completions (TRL 1.16's
`trl.rewards.other_rewards`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable[..., list[float]]:
    """A penalty proportional to the share of repeated token n-grams in a completion.

    From Appendix C.2 of "Demystifying Long Chain-of-Thought Reasoning" (arXiv:2502.03373): the reward is
    `(1 - unique_ngrams / total_ngrams) * max_penalty`, over the n-grams of `completion_ids`. A completion with no
    repeated n-gram, or shorter than `ngram_size` tokens, gets 0.0.

    Args:
        ngram_size: Length of the token n-grams.
        max_penalty: The penalty approached by a fully repetitive completion; must be `<= 0`.

    Returns:
        A picklable reward function `f(completion_ids, **kwargs)` named `repetition_penalty_reward`, with values in
        `[max_penalty, 0.0]`.

    Example:
        >>> get_repetition_penalty_reward(ngram_size=2)(completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5]])
        [0.0, -0.75]
    """
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be zero or negative (it is added to the reward), got {max_penalty}.")
    _check_count("ngram_size", ngram_size, minimum=1)
    return _TokenIdReward("repetition_penalty_reward", _repetition_penalty, (ngram_size, max_penalty))


def _repetition_penalty(ids: list[int], ngram_size: int, max_penalty: float) -> float:
    num_ngrams = len(ids) - ngram_size + 1
    if num_ngrams < 1:
        return 0.0
    unique = len({tuple(ids[i : i + ngram_size]) for i in range(num_ngrams)})
    repeated_share = 1.0 - unique / num_ngrams
    return repeated_share * max_penalty if repeated_share else 0.0


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (Eq. 13 of arXiv:2503.14476): penalize long completions, never reward short ones.

    With L = `max_completion_len`, C = `soft_punish_cache` and n = len(completion_ids): 0.0 for n <= L - C,
    (L - C - n) / C for L - C < n <= L (a linear ramp down to -1), and -1.0 for n > L.

    Args:
        max_completion_len: L, the longest completion that is not fully punished (usually the generation limit).
        soft_punish_cache: C, the width of the linear ramp; 0 punishes only completions longer than L.

    Returns:
        A picklable reward function `f(completion_ids, **kwargs)` named `soft_overlong_punishment_reward`.

    Example:
        >>> get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(completion_ids=[[1] * 90])
        [-0.5]
    """
    _check_count("max_completion_len", max_completion_len, minimum=1)
    _check_count("soft_punish_cache", soft_punish_cache, minimum=0)
    return _TokenIdReward(
        "soft_overlong_punishment_reward", _soft_overlong_punishment, (max_completion_len, soft_punish_cache)
    )


def _soft_overlong_punishment(ids: list[int], max_completion_len: int, soft_punish_cache: int) -> float:
    if len(ids) > max_completion_len:
        return -1.0
    ramp_start = max_completion_len - soft_punish_cache
    return (ramp_start - len(ids)) / soft_punish_cache if len(ids) > ramp_start else 0.0


def _check_count(name: str, value: Any, minimum: int) -> None:
    """Raise unless `value` is an integer (a number of tokens) of at least `minimum`."""
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")


@dataclass(frozen=True)
class _TokenIdReward:
    """`score(ids, *args)` for each completion, as a reward function named `name`: a dataclass of a module-level
    function rather than a closure, so it pickles (async rollouts)."""

    name: str
    score: Callable[..., float]
    args: tuple

    @property
    def __name__(self) -> str:
        return self.name

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [self.score(ids, *self.args) for ids in completion_ids]

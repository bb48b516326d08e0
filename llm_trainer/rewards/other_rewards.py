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
    if not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size must be a positive integer, got {ngram_size!r}.")
    return _RepetitionPenalty(ngram_size, max_penalty)


@dataclass(frozen=True)
class _RepetitionPenalty:
    """`get_repetition_penalty_reward`'s function: a dataclass rather than a closure so it pickles (async rollouts)."""

    ngram_size: int
    max_penalty: float
    __name__ = "repetition_penalty_reward"

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        rewards = []
        for ids in completion_ids:
            num_ngrams = len(ids) - self.ngram_size + 1
            if num_ngrams < 1:
                rewards.append(0.0)
                continue
            unique = len({tuple(ids[i : i + self.ngram_size]) for i in range(num_ngrams)})
            repeated_share = 1.0 - unique / num_ngrams
            rewards.append(repeated_share * self.max_penalty if repeated_share else 0.0)
        return rewards


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
    if not isinstance(max_completion_len, int) or max_completion_len <= 0:
        raise ValueError(f"max_completion_len must be a positive number of tokens, got {max_completion_len!r}.")
    if not isinstance(soft_punish_cache, int) or soft_punish_cache < 0:
        raise ValueError(f"soft_punish_cache must be a non-negative number of tokens, got {soft_punish_cache!r}.")
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


@dataclass(frozen=True)
class _SoftOverlongPunishment:
    """`get_soft_overlong_punishment`'s function: a dataclass rather than a closure so it pickles (async rollouts)."""

    max_completion_len: int
    soft_punish_cache: int
    __name__ = "soft_overlong_punishment_reward"

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        ramp_start = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length > self.max_completion_len:
                rewards.append(-1.0)
            elif length > ramp_start:
                rewards.append((ramp_start - length) / self.soft_punish_cache)
            else:
                rewards.append(0.0)
        return rewards

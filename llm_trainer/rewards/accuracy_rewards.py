"""Math-answer rewards graded with `math_verify`: plain accuracy, accuracy after the reasoning, and cosine length
scaling (TRL 1.16's `trl.rewards.accuracy_rewards`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._utils import check_same_length, completion_texts, import_math_verify, math_verify_timeouts

_INCOMPLETE = "[incomplete reasoning]"


def accuracy_reward(
    completions: list[str] | list[list[dict[str, str]]],
    solution: list[str],
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""1.0 when the completion's answer is mathematically equal to the gold `solution`, else 0.0.

    The gold solution is parsed with `math_verify`; when it cannot be parsed the completion gets `None` (skipped by
    the trainer). The answer is the first well-formed LaTeX expression of the completion, a `\boxed{}` one first.

    Args:
        completions: Strings, or conversations whose first message's `content` is the completion.
        solution: The raw-text gold answer of each completion (a dataset column).
        log_extra: Set by the trainer to add the `solution`, `gold_parsed` and `answer_parsed` columns to the
            completions table; leave `None` when calling directly.
        **kwargs: Other dataset columns and trainer arguments, ignored.

    Example:
        >>> accuracy_reward([r"So \boxed{\frac{1}{3}}", r"So \boxed{\frac{1}{2}}"], [r"\frac{1}{3}", r"\frac{1}{3}"])
        [1.0, 0.0]
    """
    return _grade("accuracy_reward", completion_texts(completions), solution, log_extra)


def reasoning_accuracy_reward(
    completions: list[str] | list[list[dict[str, str]]],
    solution: list[str],
    reasoning_delimiters: list[str] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""As `accuracy_reward`, but only the text after the reasoning is graded.

    The answer is what follows the last occurrence of the first delimiter (in list order) found in the completion.
    A completion containing none of the delimiters has unfinished reasoning and gets 0.0, not `None`.

    Args:
        completions: Strings, or conversations whose first message's `content` is the completion.
        solution: The raw-text gold answer of each completion (a dataset column).
        reasoning_delimiters: Strings that end the reasoning; defaults to `["</think>"]`.
        log_extra: Set by the trainer to log the `solution`, `gold_parsed` and `answer_parsed` columns.
        **kwargs: Other dataset columns and trainer arguments, ignored.

    Example:
        >>> completions = [r"<think>maybe \boxed{2}</think> \boxed{3}", r"<think>so \boxed{3}, no answer yet"]
        >>> reasoning_accuracy_reward(completions, ["3", "3"])
        [1.0, 0.0]
    """
    if reasoning_delimiters is None:
        reasoning_delimiters = ["</think>"]
    elif isinstance(reasoning_delimiters, str):
        reasoning_delimiters = [reasoning_delimiters]
    if not all(isinstance(delim, str) and delim for delim in reasoning_delimiters):
        raise ValueError(f"reasoning_delimiters must be non-empty strings, got {reasoning_delimiters!r}.")
    answers: list[str | None] = []
    for text in completion_texts(completions):
        delimiter = next((delim for delim in reasoning_delimiters if delim in text), None)
        answers.append(None if delimiter is None else text.rsplit(delimiter, 1)[-1])
    return _grade("reasoning_accuracy_reward", answers, solution, log_extra)


def _grade(
    caller: str,
    answers: list[str | None],
    solution: Sequence[str],
    log_extra: Callable[[str, list], None] | None,
) -> list[float | None]:
    """Grade each answer against its gold solution; a `None` answer marks unfinished reasoning (reward 0.0)."""
    parse, verify, LatexExtractionConfig, NormalizationConfig = import_math_verify(caller)
    check_same_length("solution", solution, answers)
    parsing_timeout, verify_timeout = math_verify_timeouts()
    # Answers must be well-formed LaTeX (no malformed-operator repair), with \boxed{} tried before anything else.
    answer_config = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]
    rewards: list[float | None] = []
    gold_logged, answer_logged = [], []
    for answer, gold_text in zip(answers, solution):
        if answer is None:
            rewards.append(0.0)
            gold_logged.append(_INCOMPLETE)
            answer_logged.append(_INCOMPLETE)
            continue
        gold = parse(str(gold_text), parsing_timeout=parsing_timeout)
        if not gold:
            rewards.append(None)
            gold_logged.append("[unparseable]")
            answer_logged.append("[skipped]")
            continue
        parsed = parse(
            answer, extraction_config=answer_config, extraction_mode="first_match", parsing_timeout=parsing_timeout
        )
        rewards.append(float(verify(gold, parsed, timeout_seconds=verify_timeout)))
        gold_logged.append(str(gold))
        answer_logged.append(str(parsed) if parsed else "[unparseable]")
    if log_extra is not None:
        log_extra("solution", list(solution))
        log_extra("gold_parsed", gold_logged)
        log_extra("answer_parsed", answer_logged)
    return rewards


def get_cosine_scaled_reward(
    max_len: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> Callable[..., list[float | None]]:
    r"""A correctness reward scaled by completion length on a cosine schedule, favouring concise reasoning.

    From Appendix C.1 of "Demystifying Long Chain-of-Thought Reasoning" (arXiv:2502.03373). With
    t = min(len(completion_ids) / max_len, 1), the reward is `lo + (hi - lo) * (1 + cos(π t)) / 2`, where
    (lo, hi) = (min_value_correct, max_value_correct) for a correct answer (shorter earns more) and
    (max_value_wrong, min_value_wrong) for a wrong one (shorter is punished more). Correctness is `accuracy_reward`'s;
    an unparseable gold solution gives `None`.

    Args:
        max_len: Length in tokens at which the schedule bottoms out; longer completions get the long-length value.
        min_value_wrong: Reward of an empty wrong completion.
        max_value_wrong: Reward of a wrong completion of `max_len` tokens or more.
        min_value_correct: Reward of a correct completion of `max_len` tokens or more.
        max_value_correct: Reward of an empty correct completion.

    Returns:
        A picklable reward function `f(completions, solution, completion_ids, **kwargs)` named
        `cosine_scaled_reward`.

    Example:
        >>> reward = get_cosine_scaled_reward(max_len=100)
        >>> reward([r"\boxed{3}", r"\boxed{4}"], solution=["3", "3"], completion_ids=[[1] * 50, [1] * 50])
        [0.75, -0.75]
    """
    if not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive number of tokens, got {max_len!r}.")
    return _CosineScaledReward(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)


@dataclass(frozen=True)
class _CosineScaledReward:
    """`get_cosine_scaled_reward`'s function: a dataclass rather than a closure so it pickles (async rollouts)."""

    max_len: int
    min_value_wrong: float
    max_value_wrong: float
    min_value_correct: float
    max_value_correct: float
    __name__ = "cosine_scaled_reward"

    def __call__(
        self,
        completions: list[str] | list[list[dict[str, str]]],
        solution: list[str],
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> list[float | None]:
        check_same_length("completion_ids", completion_ids, completions)
        rewards: list[float | None] = []
        for correct, ids in zip(accuracy_reward(completions, solution), completion_ids):
            if correct is None:
                rewards.append(None)
                continue
            # Clamped: cos is periodic, so past max_len the schedule would otherwise climb back up.
            progress = min(len(ids) / self.max_len, 1.0)
            if correct:
                low, high = self.min_value_correct, self.max_value_correct
            else:
                low, high = self.max_value_wrong, self.min_value_wrong
            rewards.append(low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * progress)))
        return rewards

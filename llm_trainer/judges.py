"""Judges: models (or rules) that compare completions, with the interface TRL's judges had (`trl.judges`).

A judge answers for a batch of prompts at once. Its family fixes the shape of the answer:

- `BasePairwiseJudge.judge(prompts, pairs)` -> the index (0 or 1) of the better completion of each pair, `-1` when
  the judge cannot tell (an invalid answer, an exhausted request budget); with `return_scores=True`, where a judge
  supports it, the probability that the first completion is the better one.
- `BaseBinaryJudge.judge(prompts, completions)` -> 1 when a completion meets the judge's constraint, 0 when it does
  not, -1 when the judge cannot tell.
- `BaseRankJudge.judge(prompts, completion_lists)` -> the completion indices of each list, best first.

`shuffle_order=True` presents each pair in random order, so a judge with a positional bias does not favour one side;
the answer is mapped back to the caller's order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = [
    "AllTrueJudge",
    "BaseBinaryJudge",
    "BaseJudge",
    "BasePairwiseJudge",
    "BaseRankJudge",
]


class BaseJudge(ABC):
    """A judge: `judge(prompts, completions, shuffle_order=True)` returns one verdict per prompt."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[str], shuffle_order: bool = True) -> list:
        """Return one verdict per prompt."""


class BaseRankJudge(ABC):
    """A judge that ranks several completions per prompt.

    `judge` returns, for each prompt, the indices of its completions from best to worst: `[2, 0, 1]` means the third
    completion is the best and the second the worst.
    """

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[list[int]]:
        """Return, for each prompt, its completion indices ordered best first."""


class BasePairwiseJudge(BaseJudge):
    """A judge that picks the better of two completions per prompt.

    `judge` returns 0 or 1 (the better completion of each pair) or -1 when it cannot tell; with `return_scores=True`
    (judges that support it) the probability that the first completion is better. Subclasses can call
    `shuffle_pairs` / `unshuffle` to implement `shuffle_order`.
    """

    @abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int | float]:
        """Return, per prompt, the index of the better completion (-1: can't tell), or its probability of being first."""

    @staticmethod
    def check_pairs(prompts: Sequence, completions: Sequence[Sequence[str]]) -> None:
        """Raise a `ValueError` unless there is exactly one pair of completions per prompt."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(completions)} completion pairs; expected one pair each."
            )
        for i, pair in enumerate(completions):
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(
                    f"A pairwise judge compares exactly 2 completions per prompt; prompt {i} has {pair!r}."
                )

    @staticmethod
    def shuffle_pairs(completions: Sequence[Sequence[str]], shuffle_order: bool) -> tuple[list[list[str]], np.ndarray]:
        """Swap each pair with probability 1/2 (numpy's global generator, so `set_seed` reproduces it).

        Returns the pairs in the order to present them and the boolean mask of swapped pairs.
        """
        flipped = np.random.rand(len(completions)) < 0.5 if shuffle_order else np.zeros(len(completions), dtype=bool)
        pairs = [[pair[1], pair[0]] if flip else [pair[0], pair[1]] for pair, flip in zip(completions, flipped)]
        return pairs, flipped

    @staticmethod
    def unshuffle(results: Sequence[int | float], flipped: np.ndarray, scores: bool = False) -> list[int | float]:
        """Map verdicts on the presented pairs back to the caller's order.

        Indices of swapped pairs become `1 - index` (-1 stays -1); scores (probability that the first completion is
        better) become `1 - score`.
        """
        out: list[int | float] = []
        for result, flip in zip(results, flipped):
            if not flip:
                out.append(result)
            elif scores:
                out.append(1.0 - float(result))
            else:
                out.append(-1 if result == -1 else 1 - int(result))
        return out


class BaseBinaryJudge(BaseJudge):
    """A judge that says whether each completion meets a constraint: 1 yes, 0 no, -1 can't tell.

    Used for the constraint judges of CGPO's mixture of judges (https://huggingface.co/papers/2409.20370).
    """

    @abstractmethod
    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Return 1, 0 or -1 per completion."""


class AllTrueJudge(BaseBinaryJudge):
    """Combine binary judges: 1 when every judge says 1, -1 when any judge cannot tell, 0 otherwise.

    This is the mixture of judges of CGPO (https://huggingface.co/papers/2409.20370).

    Args:
        judges: the binary judges to combine.
    """

    def __init__(self, judges: Sequence[BaseBinaryJudge]):
        judges = list(judges)
        if not judges:
            raise ValueError("AllTrueJudge needs at least one binary judge.")
        for judge in judges:
            if not callable(getattr(judge, "judge", None)):
                raise TypeError(f"AllTrueJudge combines binary judges (with a `judge` method); got {judge!r}.")
        self.judges = judges

    def judge(
        self,
        prompts: list[str],
        completions: list[str],
        gold_completions: list[str] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Return, per completion, 1 if all judges say 1, -1 if any says -1, else 0."""
        verdicts = [list(judge.judge(prompts, completions, gold_completions, shuffle_order)) for judge in self.judges]
        for judge, answer in zip(self.judges, verdicts):
            if len(answer) != len(prompts):
                raise ValueError(f"{type(judge).__name__} returned {len(answer)} verdicts for {len(prompts)} prompts.")
        combined = []
        for i, row in enumerate(zip(*verdicts)):
            bad = [v for v in row if v not in (0, 1, -1)]
            if bad:
                raise ValueError(f"Binary judges answer 0, 1 or -1; got {bad[0]!r} for prompt {i}.")
            combined.append(-1 if -1 in row else int(all(v == 1 for v in row)))
        return combined

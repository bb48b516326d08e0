"""Two ready environments: a single-turn math answer checker and a multi-turn guess-the-number game."""

from __future__ import annotations

import math
import random
import re
from typing import Any

from .base import EnvironmentInterface, EnvironmentStep

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


def final_number(text: str) -> float | None:
    """The last number written in `text` (`-3`, `2.5`, `1,000`), or `None` when there is none."""
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


class MathAnswerEnvironment(EnvironmentInterface):
    """Single turn: reward 1.0 when the last number of the reply equals the last number of the row's `answer`
    (`42`, `"42"` or a worked solution such as GSM8K's `"... #### 42"`), else 0.0; done after one turn."""

    def reset(self, answer: Any = None, **row: Any) -> None:
        if answer is None:
            raise ValueError(
                "MathAnswerEnvironment needs an 'answer' column in the dataset with each prompt's answer."
            )
        self.answer = final_number(str(answer))
        if self.answer is None:
            raise ValueError(f"The answer {answer!r} contains no number; give each row a numeric 'answer'.")

    def step(self, messages: list[dict[str, str]]) -> EnvironmentStep:
        guess = final_number(messages[-1]["content"])
        correct = guess is not None and math.isclose(guess, self.answer, rel_tol=1e-9, abs_tol=1e-9)
        return EnvironmentStep(observation=None, reward=float(correct), done=True)


class GuessTheNumberEnvironment(EnvironmentInterface):
    """Multi-turn: the policy guesses a secret whole number in `[low, high]`; after each guess the environment says
    "Higher." or "Lower." until the guess is right (reward 1.0) or `max_guesses` guesses are spent. Every guess
    costs `turn_cost`, so the summed reward of a game won in `n` guesses is `1 - n * turn_cost`.

    The secret is the row's `secret` column when there is one (every generation of a prompt then plays the same
    game), else drawn from `random.Random(seed)`. `reset` appends the rules to the prompt. A reply's last whole
    number is its guess; a reply without one costs a guess and is answered with the rules.
    """

    def __init__(
        self, low: int = 1, high: int = 20, max_guesses: int = 5, turn_cost: float = 0.05, seed: int | None = None
    ):
        if low >= high:
            raise ValueError(f"`low` must be below `high`, got low={low}, high={high}.")
        if max_guesses < 1:
            raise ValueError(f"`max_guesses` must be at least 1, got {max_guesses}.")
        if turn_cost < 0:
            raise ValueError(f"`turn_cost` must be >= 0, got {turn_cost}.")
        self.low, self.high, self.max_guesses, self.turn_cost = low, high, max_guesses, turn_cost
        self._rng = random.Random(seed)

    def reset(self, secret: int | None = None, **row: Any) -> str:
        self.secret = self._rng.randint(self.low, self.high) if secret is None else int(secret)
        if not self.low <= self.secret <= self.high:
            raise ValueError(f"The secret {secret} is outside [{self.low}, {self.high}]; fix the 'secret' column.")
        self.guesses = 0
        return f"\n{self._rules()} You have {self.max_guesses} guesses."

    def step(self, messages: list[dict[str, str]]) -> EnvironmentStep:
        self.guesses += 1
        numbers = _INTEGER.findall(messages[-1]["content"])
        guess = int(numbers[-1]) if numbers else None
        if guess == self.secret:
            return EnvironmentStep("Correct!", 1.0 - self.turn_cost, done=True)
        if guess is None:
            feedback = f"Please answer with one number. {self._rules()}"
        else:
            feedback = "Higher." if guess < self.secret else "Lower."
        return EnvironmentStep(feedback, -self.turn_cost, done=self.guesses >= self.max_guesses)

    def _rules(self) -> str:
        return f"I am thinking of a whole number between {self.low} and {self.high}."

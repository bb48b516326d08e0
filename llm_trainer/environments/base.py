"""The contract between a multi-turn RL rollout and the environment the policy talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple


class EnvironmentStep(NamedTuple):
    """What an environment answers to one assistant turn.

    `observation` is sent back to the policy: a string becomes the next user message; a message dict (`{"role":
    "tool", "name": ..., "content": ...}`, say) or a list of them is appended as is. It may be `None` only when
    `done` is true. `reward` is this turn's reward, and `done` ends the rollout. A plain `(observation, reward, done)`
    tuple works too.
    """

    observation: str | dict[str, Any] | list[dict[str, Any]] | None
    reward: float = 0.0
    done: bool = False


class EnvironmentInterface(ABC):
    """A stateful environment for one rollout: the policy writes assistant turns, the environment answers.

    The rollout creates one instance per rollout from a factory (the class itself, or any zero-argument callable such
    as `functools.partial(MyEnv, level=3)`), so instance attributes hold that rollout's state. Then:

    1. `reset(**row)` is called once with every column of the dataset row the prompt comes from (`prompt` included;
       only `prompt` when the row cannot be found). A string it returns is appended, as is, to the content of the
       prompt's last user message before the first turn; `None` leaves the prompt unchanged.
    2. After every assistant turn, `step(messages)` receives the conversation so far: the prompt's messages (a plain
       string prompt becomes one user message), then every assistant turn and every observation as `{"role":
       "assistant" | "user", "content": str}` messages (or the observation's own messages), ending with the turn
       just written (a copy: mutating it changes nothing). It returns an `EnvironmentStep(observation, reward,
       done)`.
    3. The rollout stops when `done` is true, after the rollout's `max_turns` turns, or when the completion-length
       budget is spent; otherwise `observation` becomes the next user message and the policy writes another turn.
       The observation of the last step is never shown to the policy.

    The rollout's reward is the sum (or the last, with `reward_reduction="last"`) of the rewards of every step.
    An environment with a `tools` attribute (a list of functions) has them rendered by the chat template.
    """

    def reset(self, **row: Any) -> str | None:
        """Start a new episode for the dataset row `row`; return text to append to the prompt, or `None`."""
        return None

    @abstractmethod
    def step(self, messages: list[dict[str, str]]) -> EnvironmentStep:
        """React to the last assistant message of `messages`: `EnvironmentStep(observation, reward, done)`."""


EnvironmentFactory = Callable[[], EnvironmentInterface]

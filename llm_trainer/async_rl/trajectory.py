"""One generated completion and the policy version that produced it: the unit the asynchronous engine moves around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One completion of one prompt, with the weights version of the generator that produced it.

    `model_version` is what bounds off-policyness: a sample consumed by a trainer at version `s` is `s - model_version`
    optimizer steps old (its *staleness*). Completions of the same prompt draw share `group_id`, so group advantages
    are computed over whole groups.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    model_version: int
    """Weights version of the generator that produced it."""
    group_id: int
    """Completions of the same prompt (the same draw) share it."""
    logprobs: list[float] | None = None
    """The generator's per-token log-probs of `completion_ids` (for importance-sampling correction)."""
    prompt: Any = None
    """The dataset prompt (text or messages)."""
    completion: Any = None
    """The decoded completion: text, or `[{"role": "assistant", "content": ...}]` for conversational prompts."""
    row: dict[str, Any] = field(default_factory=dict)
    """The dataset row (its other columns are reward-function keywords)."""
    rewards_per_func: list[float] | None = None
    """One reward per reward function (NaN where a function does not apply), once scored."""
    truncated: bool = False
    """The completion hit `max_completion_length` without an eos token."""
    prompt_index: int = -1
    """Position of the prompt in the prompt stream (for resuming)."""

    def staleness(self, current_version: int) -> int:
        """Optimizer steps between the weights that generated this sample and `current_version`."""
        return current_version - self.model_version

"""Format rewards (TRL 1.16's `trl.rewards.format_rewards`)."""

from __future__ import annotations

from typing import Any

from ._utils import completion_texts

_OPEN, _CLOSE = "<think>", "</think>"


def think_format_reward(completions: list[str] | list[list[dict[str, str]]], **kwargs: Any) -> list[float]:
    """1.0 when the completion opens with one `<think>` block that is closed by `</think>`, else 0.0.

    The completion must start with `<think>`, contain `</think>` after it and no second `<think>`; anything may follow
    the block.

    Args:
        completions: Strings, or conversations whose first message's `content` is the completion.
        **kwargs: Dataset columns and trainer arguments, ignored.

    Example:
        >>> think_format_reward(["<think>\\nreasoning\\n</think>\\nanswer", "<think>\\nreasoning\\nanswer"])
        [1.0, 0.0]
    """
    rewards = []
    for text in completion_texts(completions):
        rest = text[len(_OPEN) :]
        well_formed = text.startswith(_OPEN) and _OPEN not in rest and _CLOSE in rest
        rewards.append(1.0 if well_formed else 0.0)
    return rewards

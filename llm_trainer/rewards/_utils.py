"""Helpers shared by the reward functions: reading completion text and importing `math_verify` lazily."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

MATH_EXTRA_HINT = 'pip install "llm-trainer[math]"'


def completion_texts(completions: Sequence[str | list[dict[str, Any]]]) -> list[str]:
    """The text of each completion: the string itself, or the `content` of the first message of a conversation.

    The first message is what TRL's rewards read; a `None` content (a pure tool-call message) reads as `""`.
    """
    texts = []
    for i, completion in enumerate(completions):
        if isinstance(completion, str):
            texts.append(completion)
            continue
        if not isinstance(completion, (list, tuple)) or not completion or not isinstance(completion[0], dict):
            raise TypeError(
                f"completions[{i}] is {type(completion).__name__} {completion!r:.80}; each completion must be a string "
                'or a non-empty list of messages such as [{"role": "assistant", "content": "..."}].'
            )
        content = completion[0].get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise TypeError(
                f"completions[{i}][0]['content'] is {type(content).__name__}; the reward functions read plain-text "
                "message content (a string)."
            )
        texts.append(content)
    return texts


def check_same_length(name: str, values: Sequence, completions: Sequence) -> None:
    """Raise if a per-completion column does not have one entry per completion."""
    if len(values) != len(completions):
        raise ValueError(
            f"Got {len(completions)} completions but {len(values)} values in `{name}`; pass one `{name}` per completion "
            "(GRPOTrainer repeats each dataset column once per generation)."
        )


def import_math_verify(caller: str) -> tuple[Any, Any, Any, Any]:
    """Return `(parse, verify, LatexExtractionConfig, NormalizationConfig)`, or raise naming the extra to install."""
    try:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as err:
        raise ImportError(
            f"`{caller}` needs the `math_verify` package (and `latex2sympy2_extended`, which it pulls in). "
            f"Install them with `{MATH_EXTRA_HINT}`."
        ) from err
    return parse, verify, LatexExtractionConfig, NormalizationConfig


def math_verify_timeouts() -> tuple[int | None, int | None]:
    """`(parsing_timeout, verify_timeout)` in seconds; `(None, None)` off the main thread.

    `math_verify` enforces timeouts with `signal.alarm`, which only works in the main thread, so elsewhere they are
    turned off and the library's "timeout is disabled" warnings are silenced.
    """
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None, None

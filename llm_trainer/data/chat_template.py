"""Render conversational examples to text with a chat template, and find the prompt a preference pair shares."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .formats import is_conversational

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

# The dataset types `apply_chat_template` renders, by the set of their keys that hold messages (or the label).
_TYPE_BY_KEYS = {
    frozenset({"messages"}): "language modeling",
    frozenset({"prompt"}): "prompt-only",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"prompt", "chosen", "rejected"}): "preference",
    frozenset({"chosen", "rejected"}): "preference with implicit prompt",
    frozenset({"prompt", "completion", "label"}): "unpaired preference",
}
_TYPED_KEYS = frozenset().union(*_TYPE_BY_KEYS)


class ExampleKeysError(KeyError, ValueError):
    """An example's keys match no dataset type (a `ValueError`, and the `KeyError` TRL raises)."""

    __str__ = BaseException.__str__  # KeyError's would print the message in quotes


def common_prefix_length(first: Sequence, second: Sequence) -> int:
    """Number of leading items (tokens, characters, messages) `first` and `second` have in common.

    Some chat templates render a prompt differently alone, with its generation prompt, than followed by a
    completion; the completion then starts after this common prefix rather than after the rendered prompt.

    Example:
    ```python
    >>> common_prefix_length([1, 2, 3, 4], [1, 2, 5])
    2
    ```
    """
    mismatch = (i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    return next(mismatch, min(len(first), len(second)))


def apply_chat_template(
    example: dict[str, Any],
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    tools: list[dict | Callable] | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """Render a conversational example to text, keeping prompt and completions apart.

    `messages` becomes `text`. A `prompt` ending with a user or tool turn gets the generation prompt; one ending with
    an assistant turn is continued. Each of `chosen`, `rejected` and `completion` is rendered after the prompt and
    keeps only what follows it; without a prompt, `chosen` and `rejected` are rendered whole. `label` is passed
    through, other keys are dropped. A per-row `chat_template_kwargs` dict and `template_kwargs` reach the template,
    as does `tools`.

    Raises:
        ExampleKeysError: (a `KeyError` and a `ValueError`) if the keys match no supported dataset type.

    Example:
    ```python
    >>> example = {
    ...     "prompt": [{"role": "user", "content": "What color is the sky?"}],
    ...     "completion": [{"role": "assistant", "content": "It is blue."}],
    ... }
    >>> apply_chat_template(example, tokenizer)  # a ChatML tokenizer
    {'prompt': '<|im_start|>user\\nWhat color is the sky?<|im_end|>\\n<|im_start|>assistant\\n',
     'completion': 'It is blue.<|im_end|>\\n'}
    ```
    """
    _check_keys(example)
    tools = tools or None  # some templates (Llama) render tool boilerplate for an empty list
    row_kwargs = example.get("chat_template_kwargs") or {}

    def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return processing_class.apply_chat_template(
            messages, tools=tools, tokenize=False, **kwargs, **row_kwargs, **template_kwargs
        )

    output = {}
    if "messages" in example:
        output["text"] = render(example["messages"])
    elif "prompt" in example:
        prompt_messages = example["prompt"]
        continue_final = _continues_final_message(prompt_messages)
        prompt = render(
            prompt_messages, add_generation_prompt=not continue_final, continue_final_message=continue_final
        )
        with_prompt = {
            key: render(prompt_messages + example[key])
            for key in ("chosen", "rejected", "completion")
            if key in example
        }
        # The prompt is what every rendering agrees on (usually all of it; see `common_prefix_length`).
        shared = min((common_prefix_length(prompt, text) for text in with_prompt.values()), default=len(prompt))
        prompt = prompt[:shared]
        output["prompt"] = prompt
        output.update({key: text[len(prompt) :] for key, text in with_prompt.items()})
    else:
        output.update({key: render(example[key]) for key in ("chosen", "rejected")})
    if "label" in example:
        output["label"] = example["label"]
    return output


def _check_keys(example: dict[str, Any]) -> None:
    keys = frozenset(example) & _TYPED_KEYS
    if keys not in _TYPE_BY_KEYS:
        expected = "; ".join(f"{name}: {sorted(type_keys)}" for type_keys, name in _TYPE_BY_KEYS.items())
        raise ExampleKeysError(
            f"Invalid keys in the example: {sorted(keys)} (out of {sorted(example)}) match no dataset type. "
            f"Expected exactly one of these key sets: {expected}. Rename or drop columns to match one."
        )


def _continues_final_message(prompt: list[dict[str, Any]]) -> bool:
    """Whether a prompt's last turn is continued (assistant) rather than answered (user, tool)."""
    role = prompt[-1]["role"]
    if role not in ("user", "tool", "assistant"):
        raise ValueError(
            f"Invalid role in the last message of the prompt: {role!r}. A prompt must end with a 'user' or 'tool' "
            "turn (the generation prompt is added) or an 'assistant' turn (it is continued)."
        )
    return role == "assistant"


def maybe_apply_chat_template(
    example: dict[str, Any],
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    tools: list[dict | Callable] | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """[`apply_chat_template`] if `example` is conversational, otherwise `example` unchanged."""
    if is_conversational(example):
        return apply_chat_template(example, processing_class, tools, **template_kwargs)
    return example


def extract_prompt(example: dict[str, Sequence]) -> dict[str, Sequence]:
    """Split the prompt a preference pair shares out of its `chosen` and `rejected` sequences.

    The prompt is the longest common prefix (of characters or of messages), left one item short when it would empty
    a completion. For strings, a space just before the point of divergence starts the completions rather than ending
    the prompt. Only `prompt`, `chosen` and `rejected` are returned.

    Example:
    ```python
    >>> extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'}
    >>> extract_prompt(
    ...     {
    ...         "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
    ...         "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
    ...     }
    ... )
    {'prompt': [{'role': 'user', 'content': 'Sky?'}],
     'chosen': [{'role': 'assistant', 'content': 'Blue.'}],
     'rejected': [{'role': 'assistant', 'content': 'Green.'}]}
    ```
    """
    chosen, rejected = example["chosen"], example["rejected"]
    if not chosen or not rejected:
        raise ValueError("extract_prompt needs non-empty 'chosen' and 'rejected' to find the prompt they share.")
    end = common_prefix_length(chosen, rejected)
    if end == min(len(chosen), len(rejected)):  # one contains the other: keep a non-empty completion
        end -= 1
    elif end and chosen[end - 1] == " ":
        end -= 1
    return {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}


def maybe_extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """[`extract_prompt`] for a preference example whose prompt is implicit, otherwise `example` unchanged.

    A `prompt` is taken as implicit when it is not in the same format (standard or conversational) as `chosen`, as in
    datasets that add a plain-text `prompt` column to conversations which already include it.
    """
    if "chosen" not in example or "rejected" not in example:
        return example
    if "prompt" in example and is_conversational({"prompt": example["prompt"]}) == is_conversational(
        {"chosen": example["chosen"]}
    ):
        return example
    return extract_prompt(example)


def read_chat_template(path: str) -> str:
    """A chat template from a `.jinja` file, or from the tokenizer saved at `path`."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if path.endswith((".jinja", ".j2", ".txt")) or (not os.path.exists(path) and path.startswith((".", "/", "~"))):
        where = "" if os.path.isabs(os.path.expanduser(path)) else f" (relative to {os.getcwd()})"
        raise FileNotFoundError(
            f"`chat_template_path={path!r}`: no such file{where}. Pass a `.jinja` template file, or a tokenizer "
            "folder or Hub id whose tokenizer has a chat template."
        )
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(path).chat_template
    if not template:
        raise ValueError(
            f"`chat_template_path={path!r}` has no chat template; pass a `.jinja` file or a tokenizer with one."
        )
    return template

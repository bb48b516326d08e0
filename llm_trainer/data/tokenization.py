"""Tokenize a prompt with one or more completions, finding where each completion starts.

Shared by every trainer that learns from completions (SFT prompt-completion, DPO, ORPO, CPO, KTO, ...).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .chat_template import common_prefix_length
from .formats import is_conversational

logger = logging.getLogger(__name__)


def parse_tools(tools: str | list | None) -> list | None:
    """A dataset's `tools` cell as the chat template takes it: a list of JSON-schema dicts (or callables).

    Arrow stores tool schemas awkwardly (a list of dicts gains `None` for keys other rows have), so datasets often
    hold them as JSON text: the whole list as one string, or one string per tool. Both are decoded here; a list of
    dicts passes through, and a single schema dict becomes a one-tool list.
    """

    def decode(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"The `tools` column holds text that is not valid JSON ({error}): {text[:80]!r}. Store each row's "
                "tools as a list of JSON-schema dicts, or as the JSON text of that list."
            ) from error

    if isinstance(tools, str):
        tools = decode(tools)
    if isinstance(tools, dict):
        return [tools]
    if isinstance(tools, list):
        return [decode(tool) if isinstance(tool, str) else tool for tool in tools]
    return tools


def template_kwargs(example: dict[str, Any], chat_template: str | None = None) -> dict[str, Any]:
    """The chat-template arguments an example carries: its `tools` ([`parse_tools`]) and `chat_template_kwargs`."""
    return {
        "chat_template": chat_template,
        "tools": parse_tools(example.get("tools")),
        **(example.get("chat_template_kwargs") or {}),
    }


def tokenize(tokenizer: Any, content: str | list[dict], **kwargs: Any) -> dict[str, list[int]]:
    """Token ids of plain text (`tokenizer(text)`) or of a conversation (through the chat template, `kwargs` to it)."""
    if isinstance(content, list):
        return tokenizer.apply_chat_template(content, tokenize=True, return_dict=True, **kwargs)
    return tokenizer(text=content)


def tokenize_prompt_completions(
    tokenizer: Any,
    prompt: str | list[dict],
    completions: dict[str, str | list[dict]],
    kwargs: dict[str, Any] | None = None,
    assistant_masks: bool = False,
) -> dict[str, list[int]]:
    """Tokenize `prompt` followed by each completion; return `prompt_ids` and `<name>_ids` for each completion.

    The prompt is tokenized alone (with the generation prompt, for conversations) and with each completion; each
    completion starts where those token sequences first differ, so `prompt_ids + <name>_ids` is exactly the
    tokenization of prompt + completion. With `assistant_masks`, `<name>_assistant_masks` covers that whole sequence.

    >>> tokenize_prompt_completions(tokenizer, "The sky is", {"chosen": " blue.", "rejected": " green."})
    {'prompt_ids': [...], 'chosen_ids': [...], 'rejected_ids': [...]}
    """
    kwargs = kwargs or {}
    if is_conversational({"prompt": prompt}):
        prompt_ids = tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full = {
            name: tokenize(tokenizer, prompt + completion, return_assistant_tokens_mask=assistant_masks, **kwargs)
            for name, completion in completions.items()
        }
    else:
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full = {name: tokenizer(text=prompt + completion) for name, completion in completions.items()}
    prompt_len = min(common_prefix_length(prompt_ids, ids["input_ids"]) for ids in full.values())
    if prompt_len < len(prompt_ids):
        logger.warning(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template renders it "
            "differently, or tokens merge across the boundary): the completion starts where they diverge, %r.",
            tokenizer.decode(prompt_ids[prompt_len:]),
        )
    out = {"prompt_ids": prompt_ids[:prompt_len]}
    for name, ids in full.items():
        out[f"{name}_ids"] = ids["input_ids"][prompt_len:]
        if assistant_masks:
            out[f"{name}_assistant_masks"] = ids["assistant_masks"]
    return out

"""Chat-template utilities: training templates with assistant masks, tool-calling checks, response parsing.

The training template for a model is derived from the model's own template rather than looked up in a list of
hand-edited copies: the original template is kept verbatim, its whole output is captured, and a short scanner
re-emits that output unchanged, wrapping each assistant turn's body (from after the assistant header through its
end-of-turn token and the line break written after it) in `{% generation %}` ... `{% endgeneration %}`. The header and end-of-turn strings are found by
rendering probe conversations. The result renders exactly what the original renders, and is verified on a battery
of conversations (system message, multi-turn, reasoning, tool calls) before it is returned, so templates of families
nobody listed work too. Two exceptions, as in TRL's training templates: where turns have no end-of-turn token (GLM),
a final assistant turn gets the stop token the model emits next appended; where the template concatenates tool-call
arguments as text (DeepSeek-V3), mapping arguments are given to it as JSON text.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .data.formats import prepare_multimodal_messages
from .data.sft import has_generation_markers as _template_has_generation_markers

__all__ = [
    "add_response_schema",
    "clone_chat_template",
    "get_training_chat_template",
    "has_generation_markers",
    "is_chat_template_prefix_preserving",
    "is_chat_template_stop_token_trained",
    "parse_response",
    "prepare_multimodal_messages",
    "supports_tool_calling",
]

ProcessingClassT = TypeVar("ProcessingClassT")


def _is_processor(processing_class: Any) -> bool:
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def _inner_tokenizer(processing_class: Any) -> Any:
    return processing_class.tokenizer if _is_processor(processing_class) else processing_class


def _default_template(chat_template: str | dict[str, str] | None) -> str | None:
    """The template text; a template shipped as named variants counts as its `default` variant."""
    if isinstance(chat_template, dict):
        return chat_template.get("default")
    return chat_template


def has_generation_markers(chat_template: str | dict[str, str]) -> bool:
    """Whether `chat_template` marks assistant output with `{% generation %}` (any whitespace-trim variant), which
    `return_assistant_tokens_mask=True` needs. For named variants, the `default` one is checked."""
    return _template_has_generation_markers(_default_template(chat_template))


# ----------------------------------------------------------------------------------------------- clone
def clone_chat_template(
    model: Any,
    tokenizer: Any,
    source_tokenizer_path: str,
    resize_to_multiple_of: int | None = 64,
) -> tuple[Any, Any, list[int]]:
    """Give `tokenizer` (and `model`) the chat template of the tokenizer at `source_tokenizer_path`.

    The template and the source's added tokens missing from `tokenizer` are copied, the eos token becomes the
    source's (in the tokenizer, the model config and, for generative models, its generation config), and the
    embeddings are resized to the new vocabulary, rounded up to a multiple of `resize_to_multiple_of` (`None`: no
    rounding); the rounding slots are filled with `<extra_id_N>` tokens so the vocabulary and embeddings stay the
    same size.

    Returns:
        `(model, tokenizer, added_token_ids)`: the ids of every token added to `tokenizer`.
    """
    from transformers import AddedToken, AutoTokenizer

    source = AutoTokenizer.from_pretrained(source_tokenizer_path)
    tokenizer.chat_template = source.get_chat_template()

    vocab = tokenizer.get_vocab()
    new_tokens = [token for token in source.added_tokens_decoder.values() if token.content not in vocab]
    tokenizer.add_tokens(new_tokens)

    tokenizer.eos_token = source.eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id

    # `len(tokenizer.get_vocab())` counts base and added tokens once each, whatever the tokenizer class.
    model.resize_token_embeddings(len(tokenizer.get_vocab()), pad_to_multiple_of=resize_to_multiple_of)
    embedding_size = model.get_input_embeddings().weight.shape[0]
    index = 0
    while len(tokenizer.get_vocab()) < embedding_size:
        filler = AddedToken(f"<extra_id_{index}>")
        if tokenizer.add_tokens(filler):
            new_tokens.append(filler)
        index += 1
    if len(tokenizer.get_vocab()) != embedding_size:
        raise RuntimeError(
            f"Vocabulary size mismatch after resizing: the tokenizer has {len(tokenizer.get_vocab())} tokens but the "
            f"embedding matrix has {embedding_size} rows."
        )
    added_ids = tokenizer.convert_tokens_to_ids([token.content for token in new_tokens])
    return model, tokenizer, added_ids


# ----------------------------------------------------------------------------------------------- checks
_TOOL_PROBE_NAME = "probe_tool_name_q7"
_TOOL_PROBE_KEY = "probe_arg_key_q7"
_TOOL_PROBE_VALUE = "probe_arg_value_q7"
_TOOL_PROBE_RESULT = "probe_tool_result_q7"


def _with_string_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with every tool call's `arguments` as JSON text: some templates (DeepSeek-V3) concatenate them."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            if not isinstance(function.get("arguments"), str):
                function["arguments"] = json.dumps(function.get("arguments") or {})
    return messages


# `apply_chat_template` options that render token ids with the assistant mask (`output["assistant_masks"]`)
_WITH_MASK = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}


def _apply_template(processing_class: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    """`processing_class.apply_chat_template(messages, **kwargs)`, retried with tool-call `arguments` as JSON text
    when the template concatenates them (a TypeError)."""
    try:
        return processing_class.apply_chat_template(messages, **kwargs)
    except TypeError:
        return processing_class.apply_chat_template(_with_string_arguments(messages), **kwargs)


def supports_tool_calling(processing_class: Any) -> bool:
    """Whether the chat template renders a whole tool exchange (user -> assistant with `tool_calls` -> tool): the
    call's name, its argument key and value, and the tool's result must all appear in the text. Templates that
    reject the roles, or silently drop the calls or the tool message, do not support tool calling."""
    from jinja2 import TemplateError

    if _default_template(processing_class.chat_template) is None:
        return False
    call = {
        "type": "function",
        "function": {"name": _TOOL_PROBE_NAME, "arguments": {_TOOL_PROBE_KEY: _TOOL_PROBE_VALUE}},
    }
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": _TOOL_PROBE_NAME, "content": _TOOL_PROBE_RESULT},
    ]
    if _is_processor(processing_class):
        messages = prepare_multimodal_messages(messages)
    try:
        rendered = _apply_template(processing_class, messages, tokenize=False)
    except (TemplateError, TypeError):
        return False
    return all(p in rendered for p in (_TOOL_PROBE_NAME, _TOOL_PROBE_KEY, _TOOL_PROBE_VALUE, _TOOL_PROBE_RESULT))


def _token_ids(output: Any, batched: bool) -> list[int]:
    ids = output["input_ids"] if isinstance(output, dict) or hasattr(output, "keys") else output
    ids = list(ids)
    if batched or (ids and isinstance(ids[0], list)):
        ids = list(ids[0])
    return ids


def is_chat_template_prefix_preserving(processing_class: Any) -> bool:
    """Whether appending a tool message (and the generation prompt) leaves the tokens of the earlier conversation
    unchanged, the property a multi-turn tool loop relies on to append tool results after a completion."""
    calls = [{"type": "function", "function": {"name": "dummy", "arguments": {}}}]
    first = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    second = [*first, {"role": "tool", "name": "dummy", "content": "dummy"}]
    is_vlm = _is_processor(processing_class)
    if is_vlm:
        from PIL import Image

        image = Image.new("RGB", (8, 8))
        first = prepare_multimodal_messages(first, images=[image])
        second = prepare_multimodal_messages(second, images=[image])

    def tokens(conversation: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        output = processing_class.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
        return _token_ids(output, batched=is_vlm)

    try:
        before, after = tokens(first), tokens(second, add_generation_prompt=True)
    except TypeError:  # the template concatenates `arguments` as text
        first, second = _with_string_arguments(first), _with_string_arguments(second)
        before, after = tokens(first), tokens(second, add_generation_prompt=True)
    return after[: len(before)] == before


def is_chat_template_stop_token_trained(processing_class: Any, chat_template: str | None = None) -> bool:
    """Whether the assistant mask of `chat_template` (default: the processing class's) ends each assistant turn on
    an end-of-turn token, so the model learns to stop.

    An assistant turn followed by a user turn is rendered with `return_assistant_tokens_mask=True`; the last masked
    token that is not whitespace must be an added (special) token rather than content. A template without
    generation markers, or one that fails to render, gives `False`.
    """
    from jinja2 import TemplateError

    messages = [
        {"role": "user", "content": "dummy"},
        {"role": "assistant", "content": "dummy"},
        {"role": "user", "content": "dummy"},
    ]
    is_vlm = _is_processor(processing_class)
    if is_vlm:  # text blocks only: images would shift the mask, which is computed before image tokens expand
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    try:
        output = _apply_template(processing_class, messages, chat_template=chat_template, **_WITH_MASK)
    except (TemplateError, TypeError, ValueError):
        return False
    ids = _token_ids(output, batched=is_vlm)
    mask = output["assistant_masks"]
    mask = list(mask[0]) if is_vlm else list(mask)
    tokenizer = _inner_tokenizer(processing_class)
    added = set(tokenizer.get_added_vocab().values())
    for token_id in reversed([t for t, m in zip(ids, mask) if m]):
        if tokenizer.decode([token_id]).strip():
            return token_id in added
    return False


# ----------------------------------------------------------------------------------------------- training template
_UNSUPPORTED = (
    "The chat template is not training-compatible (missing `{{% generation %}}` markers) and patching is not "
    "supported for this template: {reason}. Please manually modify the chat template for training, wrapping what "
    "the assistant writes (through its end-of-turn token) in `{{% generation %}}` ... `{{% endgeneration %}}`."
)

# The scanner appended to the captured output. HEADERS, ENDS and STOPS are JSON lists of strings (valid Jinja
# literals). Each step emits the text through the next assistant header as is, then the turn's body inside a
# generation block: through the first end-of-turn string the turn writes itself (ENDS) and the whitespace the template
# writes right after it (line breaks), or through the first stop token it borrows from the next message (STOPS: templates whose
# turns have no end-of-turn token of their own). At equal positions the longest string wins. The loop runs at most
# once per header occurrence, plus once for the text after the last turn. `open` records that the text ended inside
# an assistant turn, so the epilogue can append the stop token such a turn would be followed by.
_SCANNER = """{%- set __llmt = namespace(rest=__llmt_text, at=-1, size=0, cut=0, steps=1, own=false, open=false) %}
{%- for __llmt_h in __LLMT_HEADERS__ %}{%- set __llmt.steps = __llmt.steps + __llmt_text.count(__llmt_h) %}{%- endfor %}
{%- for __llmt_step in range(__llmt.steps) %}
{%- if __llmt.rest %}
{%- set __llmt.at = -1 %}{%- set __llmt.size = 0 %}
{%- for __llmt_h in __LLMT_HEADERS__ %}{%- set __llmt_i = __llmt.rest.find(__llmt_h) %}
{%- if __llmt_i >= 0 and (__llmt.at < 0 or __llmt_i < __llmt.at or (__llmt_i == __llmt.at and __llmt_h|length > __llmt.size)) %}
{%- set __llmt.at = __llmt_i %}{%- set __llmt.size = __llmt_h|length %}{%- endif %}{%- endfor %}
{%- if __llmt.at < 0 %}{{- __llmt.rest }}{%- set __llmt.rest = '' %}{%- set __llmt.open = false %}{%- else %}
{{- __llmt.rest[:__llmt.at + __llmt.size] }}
{%- set __llmt.rest = __llmt.rest[__llmt.at + __llmt.size:] %}
{%- set __llmt.at = -1 %}{%- set __llmt.size = 0 %}{%- set __llmt.own = false %}
{%- for __llmt_e in __LLMT_ENDS__ + __LLMT_STOPS__ %}{%- set __llmt_i = __llmt.rest.find(__llmt_e) %}
{%- if __llmt_i >= 0 and (__llmt.at < 0 or __llmt_i < __llmt.at or (__llmt_i == __llmt.at and __llmt_e|length > __llmt.size)) %}
{%- set __llmt.at = __llmt_i %}{%- set __llmt.size = __llmt_e|length %}{%- set __llmt.own = loop.index <= __LLMT_ENDS__|length %}{%- endif %}{%- endfor %}
{%- set __llmt.open = __llmt.at < 0 %}
{%- set __llmt.cut = __llmt.rest|length if __llmt.at < 0 else __llmt.at + __llmt.size %}
{%- if __llmt.own and __LLMT_SEPARATOR__ %}{%- set __llmt_tail = __llmt.rest[__llmt.cut:] %}
{%- set __llmt.cut = __llmt.cut + __llmt_tail|length - __llmt_tail.lstrip('\\r\\n')|length %}{%- endif %}
{%- if __llmt.cut > 0 %}{%- generation %}{{- __llmt.rest[:__llmt.cut] }}{%- endgeneration %}{%- endif %}
{%- set __llmt.rest = __llmt.rest[__llmt.cut:] %}
{%- endif %}
{%- endif %}
{%- endfor %}"""

# Appended when the template's turns have no end-of-turn token of their own (GLM): a text that ends inside a final
# assistant turn gets the stop token the model would emit next (after tool calls: the one a tool result opens with),
# inside the mask, so the model learns to stop. STOP_REPLY and STOP_CALLS are JSON strings.
_EPILOGUE = """{%- if __llmt.open and messages and messages[-1].role == 'assistant' and not (add_generation_prompt is defined and add_generation_prompt) %}
{%- generation %}{{- __LLMT_STOP_CALLS__ if messages[-1].tool_calls else __LLMT_STOP_REPLY__ }}{%- endgeneration %}
{%- endif %}"""

# Prepended when the template concatenates tool-call `arguments` as text (DeepSeek-V3) and so fails on the documented
# mapping form: mapping arguments become their JSON text, which is what such a template expects to be given.
_JSON_ARGUMENTS = """{%- if messages is defined and messages %}{%- set __llmt_m = namespace(items=[]) %}
{%- for __llmt_msg in messages %}{%- if __llmt_msg.tool_calls is defined and __llmt_msg.tool_calls %}
{%- set __llmt_c = namespace(items=[]) %}{%- for __llmt_call in __llmt_msg.tool_calls %}
{%- if __llmt_call.function is defined and __llmt_call.function.arguments is mapping %}
{%- set __llmt_c.items = __llmt_c.items + [dict(__llmt_call, function=dict(__llmt_call.function, arguments=__llmt_call.function.arguments|tojson))] %}
{%- else %}{%- set __llmt_c.items = __llmt_c.items + [__llmt_call] %}{%- endif %}{%- endfor %}
{%- set __llmt_m.items = __llmt_m.items + [dict(__llmt_msg, tool_calls=__llmt_c.items)] %}
{%- else %}{%- set __llmt_m.items = __llmt_m.items + [__llmt_msg] %}{%- endif %}{%- endfor %}
{%- set messages = __llmt_m.items %}{%- endif %}"""

_MARKER = "{#- llm_trainer training variant: the model's template verbatim, assistant turns in generation blocks -#}"


@dataclass
class _TurnEnds:
    """How assistant turns end. `own`: end-of-turn strings the turn writes itself (`<|im_end|>`); `borrowed`: for
    templates whose turns have none, the tokens the next message opens with, which the model emits to stop
    (`<|user|>`); `stop_reply` / `stop_calls`: the borrowed token that follows a plain reply / a tool-call turn."""

    own: set[str] = field(default_factory=set)
    borrowed: set[str] = field(default_factory=set)
    stop_reply: str | None = None
    stop_calls: str | None = None
    # Whether the line break written after an own end joins the mask: not where it merges into the next turn's first
    # token, which would then be trained. (Spaces never join: they fuse with the next word, as in `</s> [INST]`.)
    separator: bool = True

    @property
    def all(self) -> set[str]:
        return self.own | self.borrowed

    @property
    def appends_stop(self) -> bool:
        """Whether a final assistant turn gets a stop token appended (only when the turns have no own end)."""
        return not self.own and self.stop_reply is not None


def _build_training_template(
    template: str, headers: Iterable[str], ends: _TurnEnds, json_arguments: bool = False
) -> str:
    """The original template captured whole (`+` turns off trim_blocks / lstrip_blocks at the capture tags, so its
    own leading and trailing whitespace is kept), then the scanner (and, for templates without an end-of-turn token,
    the epilogue); `json_arguments` prepends the tool-argument conversion."""

    def literal(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    scanner = _SCANNER.replace("__LLMT_HEADERS__", literal(sorted(set(headers))))
    scanner = scanner.replace("__LLMT_ENDS__", literal(sorted(ends.own)))
    scanner = scanner.replace("__LLMT_STOPS__", literal(sorted(ends.borrowed - ends.own)))
    scanner = scanner.replace("__LLMT_SEPARATOR__", literal(ends.separator))
    if ends.appends_stop:
        epilogue = _EPILOGUE.replace("__LLMT_STOP_REPLY__", literal(ends.stop_reply))
        scanner += epilogue.replace("__LLMT_STOP_CALLS__", literal(ends.stop_calls or ends.stop_reply))
    prelude = _JSON_ARGUMENTS if json_arguments else ""
    return f"{_MARKER}{prelude}{{%+ set __llmt_text +%}}{template}{{%+ endset +%}}{scanner}"


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


class _Probe:
    """Renders conversations with one template through the inner tokenizer (no processor code paths), as the
    processing class expects them (structured content for processors); `None` when the template refuses."""

    def __init__(self, processing_class: Any, template: str):
        self.tokenizer = _inner_tokenizer(processing_class)
        self.is_vlm = _is_processor(processing_class)
        self.template = template
        self.added = {token.content for token in self.tokenizer.added_tokens_decoder.values()}
        # Vision-language templates read content as a list of blocks, even when a plain tokenizer carries them.
        self.structured = self.is_vlm
        if not self.is_vlm and not self._renders_text():
            self.structured = True
            if not self._renders_text():
                self.structured = False

    def _renders_text(self) -> bool:
        rendered = self.render([_user("uqa"), _assistant("aqa")])
        return rendered is not None and "uqa" in rendered and "aqa" in rendered

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return prepare_multimodal_messages(messages) if self.structured else messages

    def render(self, messages: list[dict[str, Any]], template: str | None = None, **kwargs: Any) -> str | None:
        messages = self.messages(messages)
        for attempt in (messages, _with_string_arguments(messages)):
            try:
                return self.tokenizer.apply_chat_template(
                    attempt, chat_template=template or self.template, tokenize=False, **kwargs
                )
            except TypeError:
                continue
            except Exception:  # jinja errors, missing keys: the template rejects this conversation
                return None
        return None

    def token_prefix(self, text: str, length: int) -> str:
        """The longest prefix of `text` within `length` characters that ends on a token boundary."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
            return text[:length]
        ends = [end for _, end in offsets if end <= length]
        return text[: max(ends, default=0)]

    def is_token_boundary(self, text: str, position: int) -> bool:
        """Whether no token of `text` straddles `position` (slow tokenizers, without offsets, are taken to agree)."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError):
            return True
        return not any(start < position < end for start, end in offsets)

    def first_added_token(self, text: str) -> str | None:
        tokens = self.tokenizer.tokenize(text) if text else []
        return tokens[0] if tokens and tokens[0] in self.added else None

    def trailing_added_run(self, text: str) -> str:
        """The run of added tokens `text` ends with (empty if it ends with plain text)."""
        run = ""
        for token in reversed(self.tokenizer.tokenize(text) if text else []):
            if token not in self.added:
                break
            run = token + run
        return run


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def _calls(*names: str) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": name, "arguments": {"count": 3, "label": f"{name}val"}}}
        for name in names
    ]


def _find_headers(probe: _Probe) -> set[str]:
    """The text that opens an assistant turn (the part of the generation prompt that the rendered turn starts with),
    after a user turn, a system + user start, a previous exchange, and a tool result."""
    contexts = [
        [_user("uqa")],
        [{"role": "system", "content": "sqa"}, _user("uqa")],
        [_user("uqa"), _assistant("aqa"), _user("uqb")],
        [_user("uqa"), _assistant("", tool_calls=_calls("fqa")), {"role": "tool", "name": "fqa", "content": "tqa"}],
    ]
    turns = [
        ([_assistant("aqz")], "aqz"),
        ([_assistant("aqz"), _user("uqz")], "aqz"),
        ([_assistant("aqz", reasoning_content="rqz")], None),
        ([_assistant("", tool_calls=_calls("fqz"))], "fqz"),
    ]
    headers: set[str] = set()
    for context in contexts:
        plain = probe.render(context)
        prompted = probe.render(context, add_generation_prompt=True)
        if plain is None or prompted is None:
            continue
        generation_prompt = prompted[len(_common_prefix(plain, prompted)) :]
        for turn, sentinel in turns:
            rendered = probe.render(context + turn)
            if rendered is None:
                continue
            start = len(_common_prefix(plain, rendered))
            marks = [rendered.find(s, start) for s in ([sentinel] if sentinel else ["rqz", "aqz"])]
            marks = [m for m in marks if m >= 0]
            if not marks:
                continue
            before_turn = rendered[start : min(marks)]
            header = probe.token_prefix(generation_prompt, len(_common_prefix(generation_prompt, before_turn)))
            if not generation_prompt and sentinel == "aqz":
                # No generation prompt here (DeepSeek after a tool result, Llava-Next after `[/INST]`): the turn starts
                # after the special token that closes the previous message, plus whatever the turn renders first.
                run = probe.trailing_added_run(plain[:start])
                tokens = probe.tokenizer.tokenize(run) if run else []
                header = (tokens[-1] if tokens else "") + before_turn
            if header:
                headers.add(header)
    return headers


def _find_ends(probe: _Probe) -> _TurnEnds:
    """How the model closes a turn: what a final turn renders after its content (its own end-of-turn string), or, for
    templates that leave the final turn open, the first token the next message starts with (borrowed)."""
    ends = _TurnEnds()
    tool = {"role": "tool", "name": "fqz", "content": "tqz"}
    # Two calls when the template renders them (so a string closing each call is not taken for the turn's end),
    # else one (GPT-OSS renders a single call per turn).
    two_calls = _calls("fqy", "fqz")
    rendered = probe.render([_user("uqa"), _assistant("", tool_calls=two_calls)])
    if rendered is None or "fqyval" not in rendered or "fqzval" not in rendered:
        two_calls = _calls("fqz")
    # (final conversation, same conversation followed by another message, last assistant-written text, next text)
    cases = [
        ([_user("uqa"), _assistant("aqz")], [_user("uqa"), _assistant("aqz"), _user("uqz")], "aqz", "uqz"),
        ([_user("uqa"), _assistant("aqz", reasoning_content="rqz")], None, "aqz", None),
        (
            [_user("uqa"), _assistant("", tool_calls=two_calls)],
            [_user("uqa"), _assistant("", tool_calls=two_calls), tool],
            "fqzval",
            "tqz",
        ),
    ]
    for final_messages, followed_messages, last, following in cases:
        is_tool_turn = following == "tqz"
        final = probe.render(final_messages)
        after = ""
        if final is not None and last in final:
            after = final[final.rfind(last) + len(last) :]
            if not any(end in after for end in ends.own):
                candidate = probe.trailing_added_run(after.rstrip()) if is_tool_turn else after.rstrip()
                # A tool turn's closing run must close the turn, not each call.
                if candidate and (not is_tool_turn or final.count(candidate) == 1):
                    ends.own.add(candidate)
        if followed_messages is None:
            continue
        followed = probe.render(followed_messages)
        if followed is None or last not in followed or following not in followed:
            continue
        start = followed.rfind(last) + len(last)
        between = followed[start : followed.find(following, start)]
        closing = [end for end in ends.own if end in between]
        if closing:
            # The whitespace the template writes after the end, before the next message, is part of the turn unless
            # a token straddles its end.
            cut = start + between.find(closing[0]) + len(closing[0])
            cut += len(followed[cut:]) - len(followed[cut:].lstrip("\r\n"))
            ends.separator = ends.separator and probe.is_token_boundary(followed, cut)
            continue
        rest = followed[len(final) :] if final is not None and followed.startswith(final) else between
        token = probe.first_added_token(rest)
        if token and after.startswith(token):  # the turn writes it itself (and more when it is the last one)
            ends.own.add(token)
        elif token:
            ends.borrowed.add(token)
            if is_tool_turn:
                ends.stop_calls = token
            else:
                ends.stop_reply = token
    return ends


def _concatenates_arguments(probe: _Probe) -> bool:
    """Whether the template fails on tool-call arguments given as a mapping (the documented form) but renders them
    given as JSON text: it concatenates them as strings (DeepSeek-V3)."""
    messages = probe.messages([_user("uqa"), _assistant("", tool_calls=_calls("fqa"))])
    try:
        probe.tokenizer.apply_chat_template(messages, chat_template=probe.template, tokenize=False)
    except TypeError:
        return probe.render(messages) is not None
    except Exception:
        return False
    return False


_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "fqa",
            "description": "dqa",
            "parameters": {
                "type": "object",
                "properties": {"count": {"type": "integer"}, "label": {"type": "string"}},
                "required": ["count", "label"],
            },
        },
    }
]


def _battery() -> list[tuple[list[dict[str, Any]], dict[str, Any], list[str], list[str]]]:
    """Conversations to verify a training template on: (messages, template kwargs, texts the assistant wrote, texts
    it did not write)."""
    system = {"role": "system", "content": "sqv"}
    tool_a = {"role": "tool", "name": "fqa", "content": "tqv1"}
    tool_b = {"role": "tool", "name": "fqb", "content": "tqv2"}
    cases = [
        ([_user("uqv1"), _assistant("aqv1")], {}, ["aqv1"], ["uqv1"]),
        ([system, _user("uqv1"), _assistant("aqv1")], {}, ["aqv1"], ["sqv", "uqv1"]),
        (
            [_user("uqv1"), _assistant("aqv1"), _user("uqv2"), _assistant("aqv2")],
            {},
            ["aqv1", "aqv2"],
            ["uqv1", "uqv2"],
        ),
        ([_user("uqv1"), _assistant("aqv1"), _user("uqv2")], {}, ["aqv1"], ["uqv1", "uqv2"]),
        ([_user("uqv1"), _assistant("aqv1", reasoning_content="rqv1")], {}, ["aqv1", "rqv1"], ["uqv1"]),
        (
            [
                _user("uqv1"),
                _assistant("aqv1", reasoning_content="rqv1"),
                _user("uqv2"),
                _assistant("aqv2", reasoning_content="rqv2"),
            ],
            {},
            ["aqv1", "aqv2", "rqv1", "rqv2"],
            ["uqv1", "uqv2"],
        ),
        (
            [system, _user("uqv1"), _assistant("", tool_calls=_calls("fqa")), tool_a, _assistant("aqv2")],
            {"tools": _TOOLS},
            ["fqaval", "aqv2"],
            ["sqv", "uqv1", "tqv1", "dqa"],
        ),
        (
            [_user("uqv1"), _assistant("aqv1", tool_calls=_calls("fqa", "fqb")), tool_a, tool_b, _assistant("aqv2")],
            {},
            ["aqv1", "fqaval", "fqbval", "aqv2"],
            ["uqv1", "tqv1", "tqv2"],
        ),
        ([_user("uqv1"), _assistant("", tool_calls=_calls("fqa"))], {"tools": _TOOLS}, ["fqaval"], ["uqv1", "dqa"]),
    ]
    return cases


def _verify_training_template(probe: _Probe, training: str, ends: _TurnEnds) -> str | None:
    """Why `training` is not a faithful training variant of the probe's template, or `None` if it is.

    Every conversation of the battery the original renders must render identically (with and without the
    generation prompt and tools; a template without end-of-turn tokens may only append its stop token to a final
    assistant turn), and in the assistant mask every text the assistant wrote must be covered, no text
    it did not write may be, and each masked span not at the end of the text must end with an end-of-turn string.
    """
    probes_ok = 0
    for messages, kwargs, written, not_written in _battery():
        for generation_prompt in (False, True):
            original = probe.render(messages, add_generation_prompt=generation_prompt, **kwargs)
            if original is None:
                continue
            if ends.appends_stop and messages[-1]["role"] == "assistant" and not generation_prompt:
                original += ends.stop_calls if messages[-1].get("tool_calls") and ends.stop_calls else ends.stop_reply
            derived = probe.render(messages, template=training, add_generation_prompt=generation_prompt, **kwargs)
            if derived != original:
                return f"the derived template renders differently ({messages[-1]['role']}-final conversation)"
        original = probe.render(messages, **kwargs)
        if original is None:
            continue
        problem = _check_mask(probe, training, messages, kwargs, original, written, not_written, ends)
        if problem:
            return problem
        probes_ok += 1
    if not probes_ok:
        return "it renders none of the probe conversations"
    first = probe.render([_user("uqv1")], add_generation_prompt=True, enable_thinking=False)
    if first is not None and first != probe.render(
        [_user("uqv1")], template=training, add_generation_prompt=True, enable_thinking=False
    ):
        return "the derived template renders differently with enable_thinking=False"
    return None


def _check_mask(probe, training, messages, kwargs, text, written, not_written, ends) -> str | None:
    tokenizer = probe.tokenizer
    output = _apply_template(tokenizer, probe.messages(messages), chat_template=training, **_WITH_MASK, **kwargs)
    ids, mask = list(output["input_ids"]), list(output["assistant_masks"])
    spans, current = [], []
    for position, (token, masked) in enumerate(zip(ids, mask)):
        if masked:
            current.append(token)
        if current and (not masked or position == len(ids) - 1):
            spans.append((tokenizer.decode(current), position == len(ids) - 1 and masked))
            current = []
    masked_text = [span for span, _ in spans]
    for piece in written:
        if piece in text and not any(piece in span for span in masked_text):
            return f"the assistant mask misses assistant text ({piece!r} of a {len(messages)}-message conversation)"
    for piece in not_written:
        if any(piece in span for span in masked_text):
            return f"the assistant mask covers text the assistant did not write ({piece!r})"
    for span, at_end in spans:
        if not at_end and ends.all and not any(span.rstrip().endswith(end.rstrip()) for end in ends.all):
            return f"an assistant span does not end with an end-of-turn token ({span[-40:]!r})"
    return None


def _derive_training_template(processing_class: Any, template: str) -> str:
    probe = _Probe(processing_class, template)
    headers = _find_headers(probe)
    if not headers:
        raise ValueError(_UNSUPPORTED.format(reason="no assistant header could be found"))
    ends = _find_ends(probe)
    training = _build_training_template(template, headers, ends, json_arguments=_concatenates_arguments(probe))
    problem = _verify_training_template(probe, training, ends)
    if problem:
        raise ValueError(_UNSUPPORTED.format(reason=problem))
    return training


def get_training_chat_template(processing_class: Any = None, tokenizer: Any = None) -> str | None:
    """A variant of the processing class's chat template with `{% generation %}` markers, for assistant-only loss.

    The variant renders exactly what the model's template renders (except that, where turns have no end-of-turn
    token, a final assistant turn gets the next role token the model stops with); only the assistant-written part of
    each turn (from after the assistant header through the end-of-turn token and the line break after it) is
    wrapped in generation blocks, so
    `apply_chat_template(..., return_assistant_tokens_mask=True)` masks it. It is derived from the template itself
    and verified on probe conversations, so it works for any template whose assistant turns can be delimited.

    Args:
        processing_class: tokenizer or processor whose chat template to adapt.
        tokenizer: deprecated alias of `processing_class`.

    Returns:
        The training template, or `None` when the template already has generation markers.

    Raises:
        ValueError: the template has no markers and no faithful training variant could be derived.
    """
    if tokenizer is not None:
        if processing_class is not None:
            raise TypeError(
                "Pass only `processing_class`; `tokenizer` is a deprecated alias for backward compatibility."
            )
        warnings.warn(
            "The `tokenizer` argument of `get_training_chat_template` is deprecated; use `processing_class`.",
            FutureWarning,
            stacklevel=2,
        )
        processing_class = tokenizer
    if processing_class is None:
        raise TypeError("get_training_chat_template() missing required argument: 'processing_class'")
    template = _default_template(processing_class.chat_template)
    if template is None:
        raise ValueError(_UNSUPPORTED.format(reason="the processing class has no chat template"))
    if has_generation_markers(template):
        return None
    return _derive_training_template(processing_class, template)


# ----------------------------------------------------------------------------------------------- response parsing
def _transformers_at_least(version: str) -> bool:
    from importlib.metadata import version as installed

    from packaging.version import Version

    return Version(installed("transformers")) >= Version(version)


# transformers >= 5.13 parses generated text with a `response_template` (and takes the prompt as `prefix`); TRL's
# tests read this flag under the same name.
_SUPPORTS_RESPONSE_TEMPLATE = _transformers_at_least("5.13.0.dev0")


def _supports_response_template() -> bool:
    return _SUPPORTS_RESPONSE_TEMPLATE


def _tool_field(open_pattern: str, close_pattern: str, content: str, **extra: Any) -> dict[str, Any]:
    function = {"name": "{name}", "arguments": "{content}"} if "(?P<name>" in open_pattern else "{content}"
    return {
        "open_pattern": open_pattern,
        "close_pattern": close_pattern,
        "repeats": True,
        "content": content,
        **extra,
        "transform": {"type": "function", "function": function},
    }


def _xml_arguments(tag_pattern: str) -> dict[str, Any]:
    """Arguments written one tag pair per key; values are typed from the tool schema when transformers can (5.15+),
    else read as JSON where they parse."""
    import transformers
    from packaging.version import Version

    typed = Version(transformers.__version__) >= Version("5.15.0")
    parser = {"name": "text"} if typed else {"name": "json", "args": {"allow_non_json": True}}
    return {"content_args": {"tag_pattern": tag_pattern, "value_parser": parser}}


def _thinking(field: str = "reasoning_content", open_text: str = "<think>", close: str = r"</think>\s*") -> dict:
    return {field: {"open": open_text, "close_pattern": close, "content": "text"}}


_XML_PARAMETER = r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>"


def _response_template_for(template: str) -> dict[str, Any] | None:
    """The response template for the family `template` belongs to, recognised by how it writes turns and tool calls."""
    chatml = "<|im_start|>" in template
    if chatml and "<function=" in template and "<parameter=" in template:  # Qwen3.5 / 3.6, Nemotron 3
        prefilled = (
            "<think></think>" in template or "'<think>\\n'" in template and "truncate_history_thinking" in template
        )
        fields = {
            **_thinking(),
            "tool_calls": _tool_field(
                r"<tool_call>\s*<function=(?P<name>[^\n>]+)>",
                r"</tool_call>\s*",
                "xml-inline",
                **_xml_arguments(_XML_PARAMETER),
            ),
            "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
        }
        if "nemotron" in template.lower() or prefilled:
            fields["reasoning_content"] = {
                "open_pattern": r"(?=[\s\S]*?</think>)",
                "close_pattern": r"</think>\s*",
                "content": "text",
            }
            return {
                "defaults": {"role": "assistant"},
                "start_anchor_pattern": r"<\|im_start\|>assistant\n<think>(?:\n|</think>)?",
                "fields": fields,
            }
        return {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n", "fields": fields}
    if chatml and "<tool_call>" in template:  # Qwen2.5, Qwen3 (and -VL, Instruct-2507): JSON inside <tool_call>
        return {
            "defaults": {"role": "assistant"},
            "start_anchor": "<|im_start|>assistant\n",
            "fields": {
                **_thinking(),
                "tool_calls": _tool_field(r"<tool_call>", r"</tool_call>\s*", "json"),
                "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
            },
        }
    if "<|start_header_id|>" in template and '"parameters": ' in template:  # Llama 3.1 / 3.2 JSON tool calls
        return {
            "defaults": {"role": "assistant"},
            "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "fields": {
                "tool_calls": _tool_field(
                    r'\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*', r"\}<\|eot_id\|>\s*", "json"
                ),
                "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"},
            },
        }
    if "<|assistant|>" in template and "<arg_key>" in template:  # GLM-4-MoE
        return {
            "defaults": {"role": "assistant"},
            "start_anchor": "<|assistant|>",
            "fields": {
                **_thinking(),
                "tool_calls": _tool_field(
                    r"<tool_call>(?P<name>\S+)\n?",
                    r"</tool_call>\s*",
                    "xml-inline",
                    **_xml_arguments(r"<arg_key>(?P<key>[^<]+)</arg_key>\s*\n<arg_value>(?P<value>.*?)</arg_value>"),
                ),
                "content": {"close_pattern": r"<\|user\|>\s*|$", "content": "text"},
            },
        }
    if "<|channel|>" in template and "<|call|>" in template:  # GPT-OSS (harmony)
        return {
            "defaults": {"role": "assistant"},
            "start_anchor": "<|start|>assistant",
            "fields": {
                **_thinking("thinking", "<|channel|>analysis<|message|>", r"<\|end\|>\s*"),
                "content": {
                    "open": "<|channel|>final<|message|>",
                    "close_pattern": r"<\|return\|>\s*",
                    "content": "text",
                },
                "tool_calls": _tool_field(
                    r"to=functions\.(?P<name>\S+?)<\|channel\|>commentary\s+json<\|message\|>",
                    r"<\|call\|>\s*",
                    "json",
                ),
            },
        }
    if "<｜Assistant｜><think>\\n" in template and "<｜tool▁calls▁begin｜>" in template:  # DeepSeek-R1-Distill
        return {
            "defaults": {"role": "assistant"},
            "start_anchor": "<｜Assistant｜><think>\n",
            "fields": {
                "reasoning_content": {
                    "open_pattern": r"(?=[\s\S]*?</think>)",
                    "close_pattern": r"</think>\s*",
                    "content": "text",
                },
                "content": {"close_pattern": r"<｜end▁of▁sentence｜>\s*|$", "content": "text"},
            },
        }
    return None


def add_response_schema(processing_class: ProcessingClassT) -> ProcessingClassT:
    """Set a `response_template` on the tokenizer (the inner one of a processor) so `parse_response` can read tool
    calls and reasoning back out of generated text, for the families recognised from the chat template: Qwen2.5 /
    Qwen3 / Qwen3-VL, Qwen3.5 / 3.6, Nemotron 3, Llama 3.1 / 3.2, GLM-4-MoE, GPT-OSS and DeepSeek-R1-Distill.

    Raises:
        ValueError: the template is not recognised, or transformers is older than 5.13 (no response templates).
    """
    template = _default_template(processing_class.chat_template)
    response_template = _response_template_for(template or "")
    if response_template is None:
        raise ValueError(
            "Unrecognized chat template, failed to add response schema. Please manually set the response schema on "
            "the tokenizer or processor (its `response_template`; see the transformers docs on response parsing)."
        )
    if not _supports_response_template():
        import transformers

        raise ValueError(
            f"Response parsing needs transformers >= 5.13 (installed: {transformers.__version__}); please upgrade "
            "transformers, or set a legacy `response_schema` on the tokenizer yourself."
        )
    _inner_tokenizer(processing_class).response_template = response_template
    return processing_class


def _check_tool_calls(tool_calls: Any) -> None:
    """Raise `ValueError` on a malformed parsed tool call; a call without arguments gets `{}`."""
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise ValueError("tool_calls must be a list or None.")
    for index, call in enumerate(tool_calls):
        if not isinstance(call, dict):
            raise ValueError(f"tool_calls[{index}] must be a dict.")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool_calls[{index}] has no function name.")
        if function.get("arguments") is None:
            function["arguments"] = {}


def parse_response(
    tokenizer: Any,
    ids: list[int],
    prefix: list[int] | None = None,
    tools: list[dict | Callable] | None = None,
) -> dict:
    """The assistant message in the generated token ids `ids`, parsed with the tokenizer's response template.

    `prefix` (the prompt's ids) lets the parser see what the template pre-wrote; `tools` types the arguments from the
    tools' schemas (transformers >= 5.15). Text that does not parse (malformed or truncated tool calls) comes back
    as plain content: `{"role": "assistant", "content": <decoded text without special tokens>}`. Content is always a
    string, without a trailing eos token.
    """
    import transformers
    from packaging.version import Version

    try:
        kwargs: dict[str, Any] = {}
        if prefix is not None and _supports_response_template() and getattr(tokenizer, "response_template", None):
            kwargs["prefix"] = prefix
            if tools is not None and Version(transformers.__version__) >= Version("5.15.0"):
                kwargs["tools"] = tools
        parsed = tokenizer.parse_response(ids, **kwargs)
        if parsed is None:
            raise ValueError("nothing could be parsed")
        content = parsed.get("content")
        if isinstance(content, str) and tokenizer.eos_token:
            content = content.removesuffix(tokenizer.eos_token)
        parsed["content"] = content or ""
        if "tool_calls" in parsed:
            _check_tool_calls(parsed["tool_calls"])
    except (ValueError, TypeError):
        parsed = {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    return parsed

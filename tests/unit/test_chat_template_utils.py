"""chat_template_utils: derived training templates (checked against every model template TRL ships), tool-calling
and prefix checks, response parsing."""

import re
import warnings
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from llm_trainer import add_response_schema, get_training_chat_template, supports_tool_calling
from llm_trainer.chat_template_utils import (
    has_generation_markers,
    is_chat_template_prefix_preserving,
    is_chat_template_stop_token_trained,
    parse_response,
    prepare_multimodal_messages,
)
from llm_trainer.testing import get_tokenizer


def _trl_templates() -> dict[str, str]:
    try:
        import trl
    except ImportError:
        return {}
    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja")) if "_training" not in p.stem}


TRL_TEMPLATES = _trl_templates()
# Gemma 4 (and DiffusionGemma) render tool results and a following reply inside the model's own turn, without an
# assistant header between them; no faithful split exists, so derivation refuses them (TRL has no Gemma 4 variant).
UNDERIVABLE = {"diffusion_gemma", "gemma4", "gemma4_v3", "gemma4_v4", "gemma4_v5"}
# Special tokens the templates write: `<|...|>`, DeepSeek's fullwidth bars, and the named tags the families use.
_SPECIAL = re.compile(
    r"<[|｜][^<>\s'\"]{1,40}?[|｜]>|\[/?INST\]|<(?:start_of_turn|end_of_turn|end_of_utterance|image|think|/think|"
    r"tool_call|/tool_call|tool_response|/tool_response|arg_key|/arg_key|arg_value|/arg_value|\|channel|channel\||"
    r"\|turn|turn\||\|tool_call|tool_call\||\|tool_response|tool_response\||\|\"\|)>"
)


def _tokenizer(template: str):
    tokenizer = get_tokenizer()
    tokens = sorted(set(_SPECIAL.findall(template)))
    tokenizer.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": [*tokens, "<bos>"]})
    tokenizer.chat_template = template
    return tokenizer


def _calls(*names):
    return [{"type": "function", "function": {"name": n, "arguments": {"x": 7, "y": f"{n}arg"}}} for n in names]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}},
        },
    }
]
# (messages, apply_chat_template kwargs, what the assistant wrote, what it did not write)
CONVERSATIONS = [
    ([{"role": "user", "content": "Sky color?"}, {"role": "assistant", "content": "Blue."}], {}, ["Blue."], ["Sky"]),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello friend"},
            {"role": "user", "content": "Bye now"},
            {"role": "assistant", "content": "Goodbye friend"},
        ],
        {},
        ["Hello friend", "Goodbye friend"],
        ["Be brief", "Hi there", "Bye now"],
    ),
    (
        [
            {"role": "user", "content": "Think first"},
            {"role": "assistant", "content": "Done thinking", "reasoning_content": "Pondering deeply"},
        ],
        {},
        ["Done thinking", "Pondering deeply"],
        ["Think first"],
    ),
    (
        [
            {"role": "user", "content": "Use tools"},
            {"role": "assistant", "content": "", "tool_calls": _calls("lookup", "search")},
            {"role": "tool", "name": "lookup", "content": "ResultOne"},
            {"role": "tool", "name": "search", "content": "ResultTwo"},
            {"role": "assistant", "content": "All found"},
        ],
        {"tools": TOOLS},
        ["lookuparg", "All found"],
        ["Use tools", "ResultOne", "ResultTwo", "Look a word up"],
    ),
]


def _render(tokenizer, messages, template=None, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except TypeError:  # DeepSeek-V3 concatenates tool arguments as text
        return None
    except Exception:  # the template rejects these roles (no system, no tools, ...)
        return None


def _structured(tokenizer, messages):
    """Vision templates read content as blocks."""
    rendered = _render(tokenizer, CONVERSATIONS[0][0])
    return prepare_multimodal_messages(messages) if rendered is None or "Blue." not in rendered else messages


@pytest.mark.skipif(not TRL_TEMPLATES, reason="trl is not installed")
@pytest.mark.parametrize("name", sorted(TRL_TEMPLATES))
def test_training_template_of_every_trl_model_template(name):
    tokenizer = _tokenizer(TRL_TEMPLATES[name])
    if name in UNDERIVABLE:
        with pytest.raises(ValueError, match="not training-compatible"):
            get_training_chat_template(tokenizer)
        return
    training = get_training_chat_template(tokenizer)
    if has_generation_markers(TRL_TEMPLATES[name]):  # LFM2.5 ships its markers: nothing to derive
        assert training is None
        return
    assert has_generation_markers(training)
    checked = 0
    for messages, kwargs, written, not_written in CONVERSATIONS:
        messages = _structured(tokenizer, messages)
        for prompt in (False, True):
            original = _render(tokenizer, messages, add_generation_prompt=prompt, **kwargs)
            if original is not None:
                assert _render(tokenizer, messages, training, add_generation_prompt=prompt, **kwargs) == original
        original = _render(tokenizer, messages, **kwargs)
        if original is None:
            continue
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=training,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **kwargs,
        )
        masked = "".join(
            tokenizer.decode([t]) if m else "\x00" for t, m in zip(out["input_ids"], out["assistant_masks"])
        )
        for text in written:
            if text in original:
                assert text in masked, (name, text)
        for text in not_written:
            assert text not in masked, (name, text)
        checked += 1
    assert checked
    # The assistant's end-of-turn token is trained wherever the template writes one after a non-final turn.
    if name not in {"llava_next"}:
        assert is_chat_template_stop_token_trained(tokenizer, chat_template=training)
    prompt = [{"role": "user", "content": "Hi"}]
    prompt = _structured(tokenizer, prompt)
    assert _render(tokenizer, prompt, training, add_generation_prompt=True, enable_thinking=False) == _render(
        tokenizer, prompt, add_generation_prompt=True, enable_thinking=False
    )


def test_training_template_masks_exactly_the_reply_and_end_token():
    tokenizer = get_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    training = get_training_chat_template(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    out = tokenizer.apply_chat_template(
        messages, chat_template=training, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == "Hello<|im_end|>"


def test_training_template_none_when_markers_exist_and_argument_errors():
    tokenizer = get_tokenizer()  # its template already has generation markers
    assert get_training_chat_template(tokenizer) is None
    with pytest.warns(FutureWarning):
        assert get_training_chat_template(tokenizer=tokenizer) is None
    with pytest.raises(TypeError):
        get_training_chat_template(tokenizer, tokenizer=tokenizer)
    with pytest.raises(TypeError):
        get_training_chat_template()


def test_training_template_refuses_a_template_without_turn_structure():
    tokenizer = get_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(tokenizer)


def test_has_generation_markers_variants():
    assert has_generation_markers("{%- generation -%}x{% endgeneration %}")
    assert has_generation_markers({"default": "{% generation %}x{% endgeneration %}", "tool_use": ""})
    assert not has_generation_markers("{{ messages }}")


def test_supports_tool_calling():
    assert supports_tool_calling(get_tokenizer())
    tokenizer = get_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"  # drops calls
    assert not supports_tool_calling(tokenizer)
    tokenizer.chat_template = "{{ raise_exception('no tools') }}"
    assert not supports_tool_calling(tokenizer)


def test_prefix_preservation():
    tokenizer = get_tokenizer()
    assert is_chat_template_prefix_preserving(tokenizer)
    # Re-renders the last assistant turn differently once a message follows it.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think></think>"
        "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    assert not is_chat_template_prefix_preserving(tokenizer)


def test_stop_token_trained():
    tokenizer = get_tokenizer()
    assert is_chat_template_stop_token_trained(tokenizer)
    outside = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    assert not is_chat_template_stop_token_trained(tokenizer, chat_template=outside)
    assert not is_chat_template_stop_token_trained(tokenizer, chat_template="{{ raise_exception('no') }}")


needs_templates = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.13.0"), reason="response templates need transformers >= 5.13"
)


@needs_templates
@pytest.mark.skipif(not TRL_TEMPLATES, reason="trl is not installed")
@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "qwen3_5_think", "llama3_1", "glm4moe", "nemotron_3_nano"])
def test_parse_response_reads_back_rendered_tool_calls(name):
    tokenizer = add_response_schema(_tokenizer(TRL_TEMPLATES[name]))
    calls = [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]
    messages = [{"role": "user", "content": "What is 3*4?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    response = full["input_ids"][len(prefix["input_ids"]) :]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "multiply", "description": "Multiply.", "parameters": schema}}]
    parsed = parse_response(tokenizer, response, prefix=prefix["input_ids"], tools=tools)
    assert parsed == messages[1]


@needs_templates
def test_parse_response_falls_back_to_text_and_unknown_templates_are_refused():
    tokenizer = add_response_schema(_tokenizer(TRL_TEMPLATES.get("qwen3", "")) if TRL_TEMPLATES else get_tokenizer())
    text = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3}\n</tool_call><|im_end|>'
    ids = tokenizer(text)["input_ids"]
    parsed = parse_response(tokenizer, ids)  # malformed JSON: plain text, special tokens dropped
    assert parsed == {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    assert "multiply" in parsed["content"]
    plain = get_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="Unrecognized chat template"):
        add_response_schema(plain)


def test_module_and_top_level_exports():
    import llm_trainer
    import llm_trainer.chat_template_utils as module

    for name in ("add_response_schema", "clone_chat_template", "get_training_chat_template", "supports_tool_calling"):
        assert getattr(llm_trainer, name) is getattr(module, name)
    from llm_trainer.data_utils import prepare_multimodal_messages as shared

    assert prepare_multimodal_messages is shared
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.clone_chat_template  # noqa: B018

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


def _trl_training_templates() -> dict[str, str]:
    """TRL's hand-edited training variants, read at test time only to compare masks with."""
    try:
        import trl
    except ImportError:
        return {}
    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem.removesuffix("_training"): p.read_text(encoding="utf-8") for p in folder.glob("*_training.jinja")}


TRL_TRAINING_TEMPLATES = _trl_training_templates()
# Where our mask must differ from TRL's training template, and why. Both masks end at the same place (end-of-turn
# token and the line break after it); they differ only at the start, where TRL also trains text the generation
# prompt already supplies, so the model never writes it.
MASK_DIFFERENCES = {
    "deepseek_r1_distill": "TRL also trains the `<｜Assistant｜>` header",
    "deepseekv3": "TRL also trains the `<｜Assistant｜>` header",
    "gptoss": "TRL also trains the `<|start|>assistant` header",
    "muse_glimmer": "TRL also trains the `<|start|>assistant` header",
    "llava_next": "TRL also trains the space after `[/INST]`",
    "qwen2_5": "TRL also trains the line break after `<|im_start|>assistant`",
    "nemotron_3_5_lightning": "TRL also trains the `<think>` the generation prompt pre-fills",
    "nemotron_3_nano": "TRL also trains the `<think>` the generation prompt pre-fills",
    "nemotron_3_super": "TRL also trains the `<think>` the generation prompt pre-fills",
    "nemotron_3_ultra": "TRL also trains the `<think>` the generation prompt pre-fills",
    "qwen3_5_nothink": "TRL also trains the empty think block the generation prompt pre-fills",
    "qwen3_5_think": "TRL also trains the `<think>` the generation prompt pre-fills",
    "qwen3_6": "TRL also trains the `<think>` the generation prompt pre-fills",
    "qwen3_8": "TRL also trains the `<think>` the generation prompt pre-fills",
}
# GLM-4-MoE's assistant turns have no end-of-turn token: the model stops by emitting the next role token. As TRL's
# training template does, ours appends that token after a final assistant turn (inside the mask), so a final turn
# renders the original text plus that one token: `<|observation|>` after tool calls, `<|user|>` otherwise.
APPENDS_STOP = {"glm4moe": ("<|user|>", "<|observation|>")}
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


def _expected(name, messages, original, prompt):
    """What the training template must render: the original, plus the stop token where the family appends one."""
    if name in APPENDS_STOP and original is not None and messages[-1]["role"] == "assistant" and not prompt:
        reply, calls = APPENDS_STOP[name]
        return original + (calls if messages[-1].get("tool_calls") else reply)
    return original


def _mask(tokenizer, messages, template, **kwargs):
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


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
                expected = _expected(name, messages, original, prompt)
                assert _render(tokenizer, messages, training, add_generation_prompt=prompt, **kwargs) == expected
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
    assert trained == "Hello<|im_end|>\n"  # through the end-of-turn token and the line break the turn writes


@pytest.mark.skipif(not TRL_TRAINING_TEMPLATES, reason="trl is not installed")
@pytest.mark.parametrize("name", sorted(set(TRL_TRAINING_TEMPLATES) & set(TRL_TEMPLATES) - UNDERIVABLE))
def test_mask_matches_trl_training_template(name):
    """On every conversation TRL's training template renders as ours does, the assistant masks agree (from the
    first masked token for the families in MASK_DIFFERENCES, whose masks start earlier in TRL)."""
    tokenizer = _tokenizer(TRL_TEMPLATES[name])
    ours, theirs = get_training_chat_template(tokenizer), TRL_TRAINING_TEMPLATES[name]
    compared = 0
    for messages, kwargs, _, _ in CONVERSATIONS:
        messages = _structured(tokenizer, messages)
        rendered = _render(tokenizer, messages, ours, **kwargs)
        if rendered is None or rendered != _render(tokenizer, messages, theirs, **kwargs):
            continue
        ids, mask = _mask(tokenizer, messages, ours, **kwargs)
        trl_ids, trl_mask = _mask(tokenizer, messages, theirs, **kwargs)
        assert ids == trl_ids
        if name in MASK_DIFFERENCES:
            # We train a subset of TRL's tokens, and every TRL span ends on a token we train: same stop tokens.
            assert all(trl_mask[i] for i in range(len(mask)) if mask[i]), name
            trl_ends = [
                i for i in range(len(trl_mask)) if trl_mask[i] and (i + 1 == len(trl_mask) or not trl_mask[i + 1])
            ]
            assert all(mask[i] for i in trl_ends), name
            assert mask != trl_mask, f"{name} now matches TRL: drop it from MASK_DIFFERENCES"
        else:
            assert mask == trl_mask, (name, tokenizer.decode([t for t, m in zip(ids, mask) if m]))
        compared += 1
    assert compared


@pytest.mark.skipif(not TRL_TEMPLATES, reason="trl is not installed")
def test_glm_training_template_appends_the_stop_token_to_a_final_turn():
    tokenizer = _tokenizer(TRL_TEMPLATES["glm4moe"])
    training = get_training_chat_template(tokenizer)
    reply = [{"role": "user", "content": "Sky color?"}, {"role": "assistant", "content": "Blue."}]
    assert _render(tokenizer, reply, training) == _render(tokenizer, reply) + "<|user|>"
    calls = [{"role": "user", "content": "Use tools"}, {"role": "assistant", "content": "", "tool_calls": _calls("f")}]
    assert _render(tokenizer, calls, training) == _render(tokenizer, calls) + "<|observation|>"
    # Not after a prompt, nor when the next message is there (it already writes the token): identical text.
    for messages, prompt in (([reply[0]], True), ([*reply, {"role": "user", "content": "Bye"}], False)):
        expected = _render(tokenizer, messages, add_generation_prompt=prompt)
        assert _render(tokenizer, messages, training, add_generation_prompt=prompt) == expected
    ids, mask = _mask(tokenizer, [*reply, {"role": "user", "content": "Bye"}], training)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).endswith("Blue.<|user|>")
    ids, mask = _mask(tokenizer, reply, training)
    assert mask[-1] == 1 and tokenizer.decode(ids[-1:]) == "<|user|>"


@pytest.mark.skipif(not TRL_TEMPLATES, reason="trl is not installed")
def test_training_template_accepts_mapping_arguments_where_the_template_concatenates_text():
    # DeepSeek-V3 concatenates `arguments` as text and fails on the documented mapping form; the training variant
    # renders the mapping as its JSON text, exactly what the original renders given that text.
    tokenizer = _tokenizer(TRL_TEMPLATES["deepseekv3"])
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
    messages = [{"role": "user", "content": "3*4?"}, {"role": "assistant", "content": "Sure.", "tool_calls": [call]}]
    with pytest.raises(TypeError):
        tokenizer.apply_chat_template(messages, tokenize=False)
    as_text = [messages[0], {**messages[1], "tool_calls": [{**call, "function": {**call["function"]}}]}]
    as_text[1]["tool_calls"][0]["function"]["arguments"] = '{"a": 3, "b": 4}'
    training = get_training_chat_template(tokenizer)
    expected = tokenizer.apply_chat_template(as_text, tokenize=False)
    assert tokenizer.apply_chat_template(messages, chat_template=training, tokenize=False) == expected
    assert tokenizer.apply_chat_template(as_text, chat_template=training, tokenize=False) == expected
    # A template that takes mappings is left alone: no conversion in its variant.
    qwen = get_training_chat_template(_tokenizer(TRL_TEMPLATES["qwen2_5"]))
    assert "tojson))" not in qwen and "tojson))" in training


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

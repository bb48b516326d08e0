"""A dataset's `tools` column reaches the chat template the same way in every trainer's data preparation, whether
it holds schema dicts, the JSON text of the list, or one JSON string per tool."""

import copy
import json

import pytest
from datasets import Dataset

from llm_trainer.data.preference_dataset import prepare_preference_dataset
from llm_trainer.data.reward_dataset import prepare_reward_dataset
from llm_trainer.data.tokenization import parse_tools, template_kwargs
from llm_trainer.data.unpaired import prepare_unpaired_dataset
from llm_trainer.testing import CHAT_TEMPLATE, get_tokenizer

# Renders the name of every tool it is given, so the rendered text shows which tools reached it.
TOOLS_TEMPLATE = (
    "{%- if tools is not none %}<tools>{% for tool in tools %}{{ tool.function.name }};{% endfor %}</tools>"
    "{%- endif %}" + CHAT_TEMPLATE
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
FORMS = {
    "dicts": [WEATHER, TIME],
    "json_list": json.dumps([WEATHER, TIME]),
    "json_per_tool": [json.dumps(WEATHER), json.dumps(TIME)],
}
PROMPT = [{"role": "user", "content": "Weather in Paris?"}]
CHOSEN = [{"role": "assistant", "content": "Sunny."}]
REJECTED = [{"role": "assistant", "content": "No idea."}]


@pytest.fixture(scope="module")
def tokenizer():
    tok = copy.deepcopy(get_tokenizer())
    tok.chat_template = TOOLS_TEMPLATE
    return tok


@pytest.mark.parametrize("form", FORMS)
def test_parse_tools_gives_schema_dicts(form):
    assert parse_tools(FORMS[form]) == [WEATHER, TIME]


def test_parse_tools_edge_cases():
    assert parse_tools(None) is None
    assert parse_tools(json.dumps(WEATHER)) == [WEATHER]  # one schema, not in a list
    assert parse_tools([]) == []  # empty stays empty (the template call turns it into None)
    with pytest.raises(ValueError, match="`tools` column holds text that is not valid JSON"):
        parse_tools("get_weather(city)")
    kwargs = template_kwargs({"tools": FORMS["json_list"], "chat_template_kwargs": {"think": True}}, "tmpl")
    assert kwargs == {"chat_template": "tmpl", "tools": [WEATHER, TIME], "think": True}


def _prepared(kind: str, tools, tokenizer) -> list[int]:
    """The token ids of the prompt as each trainer's preparation renders it with `tools`."""
    if kind == "preference":
        rows = {"prompt": [PROMPT], "chosen": [CHOSEN], "rejected": [REJECTED], "tools": [tools]}
        return prepare_preference_dataset(Dataset.from_dict(rows), tokenizer)[0]["prompt_ids"]
    if kind == "unpaired":
        rows = {"prompt": [PROMPT] * 2, "completion": [CHOSEN, REJECTED], "label": [True, False], "tools": [tools] * 2}
        return prepare_unpaired_dataset(Dataset.from_dict(rows), tokenizer)[0]["prompt_ids"]
    rows = {"prompt": [PROMPT], "chosen": [CHOSEN], "rejected": [REJECTED], "tools": [tools]}
    return prepare_reward_dataset(Dataset.from_dict(rows), tokenizer)[0]["chosen_ids"]


@pytest.mark.parametrize("kind", ["preference", "unpaired", "reward"])
def test_every_form_renders_the_same_tools(kind, tokenizer):
    ids = {form: _prepared(kind, tools, tokenizer) for form, tools in FORMS.items()}
    assert "<tools>get_weather;get_time;</tools>" in tokenizer.decode(ids["dicts"])
    assert ids["json_list"] == ids["dicts"]
    assert ids["json_per_tool"] == ids["dicts"]

"""The OpenAI-compatible `/v1/chat/completions` of a live `llm-trainer vllm-serve --backend transformers`, over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
from transformers import AutoModelForCausalLM

from llm_trainer.generation import SamplingConfig, TransformersGenerator
from llm_trainer.testing import get_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Beautiful is better than?"}]


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """`(status, JSON reply)` of a GET (no body) or a JSON POST, HTTP errors included (plain urllib, no client)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(url: str, **request) -> tuple[int, dict]:
    return http(f"{url}/v1/chat/completions", json.dumps({"model": "tiny", "messages": MESSAGES, **request}).encode())


def ok(url: str, **request) -> dict:
    status, reply = chat(url, **request)
    assert status == 200, reply
    return reply


def test_models_lists_the_served_model(server_url, tiny_model_path):
    status, reply = http(f"{server_url}/v1/models")
    assert status == 200
    assert reply["object"] == "list" and [model["id"] for model in reply["data"]] == [tiny_model_path]


def test_reply_has_the_openai_shape_and_the_templated_greedy_completion(server_url, tiny_model_path):
    reply = ok(server_url, max_tokens=6, temperature=0)
    assert reply["id"].startswith("chat") and reply["object"] == "chat.completion"
    assert isinstance(reply["created"], int) and reply["model"] == tiny_model_path
    [choice] = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in {"stop", "length"}
    # the served model's chat template with the generation prompt, then the engine's greedy generation
    tokenizer = get_tokenizer()
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    greedy = SamplingConfig(max_tokens=6, temperature=0)
    local = TransformersGenerator(
        model, greedy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    [expected] = local.generate([prompt_ids]).completion_ids
    assert choice["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids) and usage["completion_tokens"] == len(expected)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (choice["finish_reason"] == "length") == (len(expected) == 6 and expected[-1] != tokenizer.eos_token_id)


def test_n_gives_n_choices(server_url):
    reply = ok(server_url, n=2, max_tokens=4, temperature=1.0, top_p=0.9)
    assert [choice["index"] for choice in reply["choices"]] == [0, 1]
    assert all(choice["message"]["role"] == "assistant" for choice in reply["choices"])
    assert reply["usage"]["completion_tokens"] == sum(len(choice["token_ids"]) for choice in reply["choices"])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_respected(server_url, field):
    reply = ok(server_url, n=3, temperature=1.0, **{field: 2})
    assert reply["usage"]["completion_tokens"] <= 3 * 2
    for choice in reply["choices"]:
        assert 1 <= len(choice["token_ids"]) <= 2
        assert choice["finish_reason"] == "stop" or len(choice["token_ids"]) == 2


def test_greedy_and_seeded_sampling_are_reproducible(server_url):
    def contents(**request) -> list[str]:
        return [choice["message"]["content"] for choice in ok(server_url, max_tokens=8, **request)["choices"]]

    assert contents(temperature=0) == contents(temperature=0)
    assert contents(temperature=1.0, seed=7, n=2) == contents(temperature=1.0, seed=7, n=2)


def test_stop_strings_cut_the_content(server_url):
    free = ok(server_url, max_tokens=12, temperature=0)["choices"][0]
    text = free["message"]["content"]
    assert len(text) >= 4, text  # the tiny model's greedy completion is long enough to cut in the middle
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for value in (stop, [stop, "never seen"]):
        cut = ok(server_url, max_tokens=12, temperature=0, stop=value)["choices"][0]
        assert cut["message"]["content"] == text[: text.find(stop)]
        assert cut["finish_reason"] == "stop"
        assert cut["token_ids"] == free["token_ids"][: len(cut["token_ids"])]
        assert len(cut["token_ids"]) < len(free["token_ids"]) or free["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "hi"}, {"content": "hi"}]}, "messages[1]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": "seven"}, "seed"),
        ({"stream": True}, "stream"),
    ],
)
def test_bad_requests_get_an_openai_error_naming_the_field(server_url, request_, param):
    status, reply = chat(server_url, **request_)
    assert status == 400
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == 400
    assert param.split("[")[0] in error["message"] or "role" in error["message"]


def test_a_body_that_is_not_a_json_object_is_a_400(server_url):
    for body in (b"not json", b"[1, 2]"):
        status, reply = http(f"{server_url}/v1/chat/completions", body)
        assert status == 400 and "JSON object" in reply["error"]["message"]


@contextlib.contextmanager
def serve_in_process(path: str):
    """The same HTTP server as `llm-trainer vllm-serve --backend transformers`, on a thread, for a one-off model."""
    from llm_trainer.generation.server import TransformersEngine, make_server

    server = make_server(TransformersEngine(path), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_without_a_chat_template_is_a_clear_400(tmp_path):
    """The tiny model with its chat template removed."""
    from llm_trainer.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "plain")
    tokenizer = get_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.remove(os.path.join(path, "chat_template.jinja"))
    with serve_in_process(path) as url:
        status, reply = chat(url, max_tokens=2)
        assert status == 400 and "has no chat template" in reply["error"]["message"]
        # a template sent with the request is used instead
        template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        assert chat(url, max_tokens=2, chat_template=template)[0] == 200


PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello."]
PAIRS = [["4", "5"], ["blue", "seven"], ["hello", "goodbye"]]


def test_openai_pairwise_judge_against_the_live_server(server_url, tiny_model_path):
    """`OpenAIPairwiseJudge` (TRL's judge API) pointed at the server: its verdicts are the server's greedy replies to
    its questions, parsed; a random tiny model's replies are rarely a digit, so the contract is checked, not a choice."""
    from llm_trainer.judges import OpenAIPairwiseJudge, _parse_choice

    judge = OpenAIPairwiseJudge(
        model=tiny_model_path, base_url=f"{server_url}/v1", api_key="local", request_kwargs={"temperature": 0}
    )
    verdicts = judge.judge(PROMPTS, PAIRS, shuffle_order=False)
    assert len(verdicts) == len(PAIRS) and set(verdicts) <= {0, 1, -1}
    assert judge.num_requests == len(PAIRS)
    replies = [
        ok(server_url, messages=[{"role": "user", "content": judge.question(p, pair)}], max_tokens=1, temperature=0)
        for p, pair in zip(PROMPTS, PAIRS)
    ]
    assert all(reply["usage"]["completion_tokens"] == 1 for reply in replies)
    assert verdicts == [_parse_choice(reply["choices"][0]["message"]["content"]) for reply in replies]
    shuffled = judge.judge(PROMPTS, PAIRS)  # the default: each pair in a random order, verdicts mapped back
    assert len(shuffled) == len(PAIRS) and set(shuffled) <= {0, 1, -1}


def test_openai_pairwise_judge_gets_definite_verdicts_from_a_digit_model(digit_model_path):
    """A tiny model rigged to answer only "0" or "1" (conftest): every pair gets a definite verdict through the route."""
    from llm_trainer.judges import OpenAIPairwiseJudge

    path = digit_model_path
    with serve_in_process(path) as url:
        judge = OpenAIPairwiseJudge(model="digits", base_url=f"{url}/v1", request_kwargs={"temperature": 0})
        verdicts = judge.judge(PROMPTS, PAIRS)
        assert len(verdicts) == len(PAIRS) and set(verdicts) <= {0, 1}
        assert judge.num_requests == len(PAIRS)

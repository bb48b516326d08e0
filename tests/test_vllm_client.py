"""TRL's `VLLMClient` API driving a live `llm-trainer vllm-serve --backend transformers` on localhost."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.generation import GenerationClient, SamplingConfig, TransformersGenerator
from llm_trainer.generation.vllm_client import VLLMClient, parse_logprobs, to_openai_messages
from llm_trainer.testing import ZEN_OF_PYTHON, get_tokenizer
from llm_trainer.trainer.utils import free_port

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def client(server_url) -> VLLMClient:
    return VLLMClient(base_url=server_url, connection_timeout=5)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(line)["input_ids"] for line in (ZEN_OF_PYTHON[1], ZEN_OF_PYTHON[9])]


def local_greedy(model, tokenizer, prompt_ids):
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0)
    generator = TransformersGenerator(
        model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return generator.generate(prompt_ids).completion_ids


def test_server_description(client, server_url, tiny_model_path):
    assert client.model == tiny_model_path
    assert client.base_url == server_url and client.host == "127.0.0.1"
    assert client.get_world_size() == 1
    assert client.get_server_info()["weight_transfer_config"] == {"backend": "http"}


def test_generate_token_ids_matches_the_local_model(client, model, tokenizer, prompts):
    out = client.generate(prompts, temperature=0.0, max_tokens=MAX_TOKENS)
    assert out["prompt_ids"] == prompts
    assert out["completion_ids"] == local_greedy(model, tokenizer, prompts)
    # logprobs=0: one candidate per position, the sampled token, with a log-probability
    assert out["logprob_token_ids"] == [[[token] for token in ids] for ids in out["completion_ids"]]
    assert [[len(c) for c in row] for row in out["logprobs"]] == [[1] * len(ids) for ids in out["completion_ids"]]
    assert all(c[0] <= 0 for row in out["logprobs"] for c in row)


def test_generate_text_prompts_with_n(client, tokenizer):
    out = client.generate(["Hello", "Beautiful is"], n=3, max_tokens=4, logprobs=None, generation_kwargs={"seed": 1})
    assert out["prompt_ids"] == [tokenizer.encode("Hello"), tokenizer.encode("Beautiful is")]
    assert len(out["completion_ids"]) == 6 and all(1 <= len(ids) <= 4 for ids in out["completion_ids"])
    assert out["logprobs"] is None and out["logprob_token_ids"] is None
    # the seed reaches the back end: the same request samples the same completions
    again = client.generate(["Hello", "Beautiful is"], n=3, max_tokens=4, logprobs=None, generation_kwargs={"seed": 1})
    assert again["completion_ids"] == out["completion_ids"]


def test_chat_applies_the_chat_template(client, model, tokenizer):
    conversations = [[{"role": "user", "content": ZEN_OF_PYTHON[1]}], [{"role": "user", "content": "Hi"}]]
    out = client.chat(conversations, n=2, temperature=0.0, max_tokens=MAX_TOKENS)
    expected_prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    expected_prompts = [tokenizer.encode(text, add_special_tokens=False) for text in expected_prompts]
    assert out["prompt_ids"] == expected_prompts
    expected = local_greedy(model, tokenizer, expected_prompts)
    assert out["completion_ids"] == [expected[0], expected[0], expected[1], expected[1]]
    assert len(out["logprobs"]) == 4


def test_weight_updates_change_outputs(client, model, tokenizer, prompts):
    before = client.generate(prompts, temperature=0.0, max_tokens=MAX_TOKENS)["completion_ids"]
    perturbed = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    client.init_communicator(device="cpu")  # HTTP weight transfer: no NCCL group, so CPU is fine
    try:
        client.update_model_params(perturbed)
        client.reset_prefix_cache()
        after = client.generate(prompts, temperature=0.0, max_tokens=MAX_TOKENS)["completion_ids"]
        assert after == local_greedy(perturbed, tokenizer, prompts)
        assert after != before
    finally:
        with client.weight_update():  # restore
            client.update_model_params(model)
        client.close_communicator()
    assert client.generate(prompts, temperature=0.0, max_tokens=MAX_TOKENS)["completion_ids"] == before


def test_update_named_params_checks_its_metadata(client, model):
    name, param = next(iter(model.named_parameters()))
    metadata = [(name, "float32", list(param.shape))]
    client.update_named_params(metadata, iter([(name, param.data)]))
    client.update_named_param(name, param.data)
    with pytest.raises(ValueError, match="metadata announced"):
        client.update_named_params(metadata, iter([("other", param.data)]))
    with pytest.raises(ValueError, match="announced 2 tensors, but 1"):
        client.update_named_params(metadata * 2, iter([(name, param.data)]))


def test_unsupported_requests_fail_clearly(client, server_url):
    with pytest.raises(RuntimeError, match="not.a.param"):
        client.update_named_param("not.a.param", torch.zeros(2))
    with pytest.raises(NotImplementedError, match="Multimodal"):
        client.image_features([[None]])
    with pytest.raises(NotImplementedError, match="prompt_logprobs"):
        client.get_sequence_logprobs([[1, 2, 3]], [1])
    http = GenerationClient(server_url)
    # TRL's NCCL announcement is refused with a message naming the HTTP path
    with pytest.raises(RuntimeError, match="HTTP 400.*over HTTP, not through vLLM's NCCL"):
        http.post_json("/update_weights", {"update_info": {"names": ["x"]}})
    with pytest.raises(RuntimeError, match="HTTP 400.*multimodal"):
        image_part = {"type": "image_url", "image_url": {"url": "data:,"}}
        http.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": [image_part]}]})


def test_unreachable_server_raises_connection_error():
    with pytest.raises(ConnectionError, match="llm-trainer vllm-serve"):
        VLLMClient(host="127.0.0.1", server_port=free_port())


def test_parse_logprobs_both_reply_shapes():
    completion = {
        "tokens": ["token_id:5", "token_id:7"],
        "token_logprobs": [-0.5, float("nan")],
        "top_logprobs": [{"token_id:9": -0.1}, None],
    }
    chat = {
        "content": [
            {"token": "token_id:3", "logprob": -2.0, "top_logprobs": [{"token": "token_id:4", "logprob": -1.0}]}
        ]
    }
    logprobs, ids = parse_logprobs([completion])
    assert ids == [[[9, 5], [7]]]  # descending probability; the sampled token is always listed
    assert logprobs[0][0] == [-0.1, -0.5] and logprobs[0][1] == [None]
    logprobs, ids = parse_logprobs([chat])
    assert ids == [[[4, 3]]] and logprobs == [[[-1.0, -2.0]]]
    assert parse_logprobs([None]) == (None, None)


def test_to_openai_messages_inlines_images():
    from PIL import Image

    image = Image.new("RGB", (2, 2))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    converted = to_openai_messages(messages)
    assert converted[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert converted[0]["content"][1] == {"type": "text", "text": "hi"}
    assert messages[0]["content"][0]["type"] == "image"  # the input is left unchanged

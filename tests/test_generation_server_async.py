"""The generation server as asynchronous trainers use it: versioned (bucketed) weight updates, replies tagged with
the version that produced them, LoRA adapter-only updates, heartbeats, and timeouts / dead servers that raise instead
of hanging. Each test drives a real `llm-trainer vllm-serve --backend transformers` process over HTTP."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from llm_trainer.generation import GenerationClient, SamplingConfig, TransformersGenerator
from llm_trainer.testing import ZEN_OF_PYTHON, get_tokenizer
from llm_trainer.trainer.utils import free_port

GREEDY = SamplingConfig(max_tokens=8, temperature=0)


@contextlib.contextmanager
def server_process(model_path: str):
    """`llm-trainer vllm-serve --backend transformers` as a child process: yields `(process, url)`; always reaped."""
    port = free_port()
    command = [sys.executable, "-m", "llm_trainer.cli", "vllm-serve", "--backend", "transformers"]
    command += ["--model", model_path, "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm-serve exited with {process.returncode}:\n{process.stderr.read()}")
            try:
                GenerationClient(url)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            process.kill()
        process.wait()
        process.stderr.close()


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with server_process(tiny_model_path) as (_, url):
        yield url


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def perturbed(model):
    torch.manual_seed(0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return other


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(line)["input_ids"] for line in (ZEN_OF_PYTHON[1], ZEN_OF_PYTHON[9], "Hello")]


def local(model, tokenizer, prompts, sampling=GREEDY):
    generator = TransformersGenerator(
        model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, return_logprobs=True
    )
    return generator.generate(prompts)


def restore(client: GenerationClient, model) -> int:
    """Serve `model` again, as the next version; returns that version."""
    version = client.health()["model_version"] + 1
    client.update_weights(model.named_parameters(), version=version)
    return version


def test_health_and_every_generation_reply_carry_the_model_version(server, prompts):
    client = GenerationClient(server)
    health = client.health()
    assert health["status"] == "ok" and health["requests_in_flight"] == 0 and not health["lora_adapter"]
    version = health["model_version"]
    assert isinstance(version, int)
    assert client.generate(prompts[:1], sampling=GREEDY).model_version == version
    completion = client.post_json("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "logprobs": 0})
    assert completion["model_version"] == version and completion["choices"][0]["logprobs"]["token_logprobs"]
    chat = client.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert chat["model_version"] == version and chat["object"] == "chat.completion"


def test_a_versioned_bucketed_update_lands_whole_with_its_last_chunk(server, model, perturbed, tokenizer, prompts):
    client = GenerationClient(server)
    before = local(model, tokenizer, prompts).completion_ids
    after = local(perturbed, tokenizer, prompts).completion_ids
    assert before != after
    version = client.health()["model_version"] + 1
    try:
        # One staged chunk changes nothing that generation sees, nor the version.
        params = dict(perturbed.named_parameters())
        first = {name: params[name] for name in list(params)[:3]}
        staged = client._request("POST", f"/update_weights/?version={version}&chunk=0&final=0", save(first))
        assert staged["staged"] == 1 and staged["model_version"] == version - 1
        served = client.generate(prompts, sampling=GREEDY)
        assert served.completion_ids == before and served.model_version == version - 1
        # A final chunk that does not follow the staged ones is refused; the update must be resent.
        with pytest.raises(RuntimeError, match="resend the whole update"):
            client._request("POST", f"/update_weights/?version={version}&chunk=5&final=1", save(first))
        assert client.health()["model_version"] == version - 1
        # A bucketed update with one misfit is refused whole: nothing of it is served.
        bad = [*perturbed.named_parameters(), ("lm_head.weight", torch.zeros(2, 2))]
        with pytest.raises(RuntimeError, match="size mismatch"):
            client.update_weights(bad, chunk_bytes=4096, version=version)
        served = client.generate(prompts, sampling=GREEDY)
        assert served.completion_ids == before and served.model_version == version - 1

        tensors = len(params)
        assert client.update_weights(perturbed.named_parameters(), chunk_bytes=4096, version=version) == tensors
        assert client.health()["model_version"] == version
        served = client.generate(prompts, sampling=GREEDY)
        assert served.completion_ids == after and served.model_version == version
        # Unversioned updates (TRL's path) load at once and keep the version.
        client.update_weights(model.named_parameters(), chunk_bytes=4096)
        served = client.generate(prompts, sampling=GREEDY)
        assert served.completion_ids == before and served.model_version == version
        # An empty versioned update still moves the version.
        assert client.update_weights([], version=version + 1) == 0
        assert client.health()["model_version"] == version + 1
    finally:
        restore(client, model)
    with pytest.raises(ValueError, match="version must be an integer"):
        client.update_weights([], version="3")


def test_a_request_in_flight_during_an_update_finishes_on_the_old_version(
    server, model, perturbed, tokenizer, prompts
):
    client = GenerationClient(server)
    start = client.health()
    long = SamplingConfig(max_tokens=32, temperature=0)
    batch = prompts * 2
    expected = {
        start["model_version"]: local(model, tokenizer, batch, long).completion_ids,
        start["model_version"] + 1: local(perturbed, tokenizer, batch, long).completion_ids,
    }
    replies = []
    worker = threading.Thread(target=lambda: replies.append(client.generate(batch, sampling=long)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the request runs on the engine (or is already done)
            health = client.health()
            if health["requests_in_flight"] or health["requests_served"] > start["requests_served"]:
                break
            assert time.monotonic() < deadline, "the generation request never reached the engine"
            time.sleep(0.01)
        client.update_weights(perturbed.named_parameters(), version=start["model_version"] + 1)
        worker.join(timeout=60)
        assert not worker.is_alive()
        (reply,) = replies
        # It started before the update, so it ran (entirely) on the old weights, and says so.
        assert reply.model_version == start["model_version"]
        assert reply.completion_ids == expected[reply.model_version]
        after = client.generate(batch, sampling=long)
        assert after.model_version == start["model_version"] + 1
        assert after.completion_ids == expected[after.model_version]
    finally:
        worker.join(timeout=60)
        restore(client, model)


def test_lora_adapter_updates_serve_the_trainers_peft_model(server, tiny_model_path, model, tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    client = GenerationClient(server)
    base = local(model, tokenizer, prompts)

    def peft_model(seed: int, **config):
        torch.manual_seed(seed)
        policy = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(init_lora_weights=False, **config)
        )
        # one training step, so the adapter is a trained one rather than its initialization
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
        ids = torch.tensor([prompts[0]])
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        return policy.eval()

    first = peft_model(0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    second = peft_model(1, r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"])
    version = client.health()["model_version"]
    try:
        for policy in (first, second, first):
            version += 1
            sent = client.update_lora_adapter(policy, version=version)
            assert sent == len([n for n, p in policy.named_parameters() if "lora_" in n])
            health = client.health()
            assert health["lora_adapter"] and health["model_version"] == version
            expected = local(policy, tokenizer, prompts)
            served = client.generate(prompts, sampling=GREEDY)
            assert served.model_version == version
            assert served.completion_ids == expected.completion_ids != base.completion_ids
            # the same float32 computation on both sides: log-probs agree to float rounding of log-softmax
            for got, want in zip(served.logprobs, expected.logprobs):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
            completion = client.post_json(
                "/v1/completions", {"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "logprobs": 0}
            )
            assert completion["choices"][0]["token_ids"] == expected.completion_ids[0]
            assert completion["model_version"] == version

        with pytest.raises(RuntimeError, match="does not fit the served model"):
            client._request(
                "POST",
                "/update_lora_adapter/",
                save({"nope.lora_A.weight": torch.zeros(2, 2)}),
                headers={"X-LoRA-Config": json.dumps({"r": 2, "target_modules": ["q_proj"]})},
            )
        # A refused adapter leaves the served one (and its version) as they were.
        served = client.generate(prompts, sampling=GREEDY)
        assert served.model_version == version
        assert served.completion_ids == local(first, tokenizer, prompts).completion_ids
        with pytest.raises(RuntimeError, match="send merged weights"):
            client._request(
                "POST",
                "/update_lora_adapter/",
                save({}),
                headers={"X-LoRA-Config": json.dumps({"r": 2, "init_lora_weights": "pissa"})},
            )
        with pytest.raises(RuntimeError, match="X-LoRA-Config"):
            client._request("POST", "/update_lora_adapter/", save({}))
        with pytest.raises(ValueError, match="needs a peft model"):
            client.update_lora_adapter(model)
        # A full update replaces the policy: the adapter goes.
        version = restore(client, model)
        assert not client.health()["lora_adapter"]
        served = client.generate(prompts, sampling=GREEDY)
        assert served.completion_ids == base.completion_ids and served.model_version == version
    finally:
        restore(client, model)


def test_a_stuck_server_times_out_and_a_dead_one_is_a_connection_error(tiny_model_path, model, prompts):
    with server_process(tiny_model_path) as (process, url):
        client = GenerationClient(url, request_timeout=1, weight_sync_timeout=1)
        process.send_signal(signal.SIGSTOP)  # it stops answering, with its socket still open
        try:
            with pytest.raises(TimeoutError, match=rf"{url}/generate/.*request_timeout=1 s"):
                client.generate(prompts, sampling=GREEDY)
            with pytest.raises(TimeoutError, match=rf"{url}/health/.*request_timeout=1 s"):
                client.health()
            with pytest.raises(TimeoutError, match=rf"{url}/update_weights/.*weight_sync_timeout=1 s"):
                client.update_weights(model.named_parameters(), version=1)
            with pytest.raises(TimeoutError, match=rf"{url}/update_lora_adapter/.*weight_sync_timeout=2 s"):
                client._request("POST", "/update_lora_adapter/", b"", timeout=2, timeout_name="weight_sync_timeout")
        finally:
            process.send_signal(signal.SIGCONT)
        assert client.health()["status"] == "ok"  # it answers again once resumed
        process.kill()
        process.wait()
    with pytest.raises(ConnectionError, match=rf"{url}/generate/.*not reachable"):
        client.generate(prompts, sampling=GREEDY)
    with pytest.raises(ConnectionError, match=rf"{url}/update_weights/.*not reachable"):
        client.update_weights(model.named_parameters(), version=2)
    with pytest.raises(ConnectionError, match=url):
        client.health()


def test_bad_timeouts_are_refused_before_any_request():
    with pytest.raises(ValueError, match="weight_sync_timeout must be a positive"):
        GenerationClient("http://127.0.0.1:9", weight_sync_timeout=0)

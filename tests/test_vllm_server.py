"""A live `llm-trainer vllm-serve --backend transformers` on localhost, driven through the real HTTP client."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.generation import (
    GenerationClient,
    SamplingConfig,
    TransformersGenerator,
    VLLMServerGenerator,
    make_generator,
)
from llm_trainer.testing import ZEN_OF_PYTHON, get_tokenizer
from llm_trainer.trainer.utils import free_port

GREEDY = SamplingConfig(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(line)["input_ids"] for line in (ZEN_OF_PYTHON[1], ZEN_OF_PYTHON[9], "Hello")]


def local(model, tokenizer, sampling=GREEDY):
    return TransformersGenerator(
        model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )


def remote(server_url, tokenizer, sampling=GREEDY):
    return VLLMServerGenerator(sampling, base_url=server_url, eos_token_id=tokenizer.eos_token_id)


def test_health(server_url):
    reply = GenerationClient(server_url).check_server()
    assert reply["status"] == "ok" and reply["backend"] == "transformers"


def test_greedy_generation_matches_the_local_model(server_url, model, tokenizer, prompts):
    served = remote(server_url, tokenizer).generate(prompts)
    assert served.completion_ids == local(model, tokenizer).generate(prompts).completion_ids
    assert [len(lp) for lp in served.logprobs] == [len(ids) for ids in served.completion_ids]
    assert all(lp <= 0 for row in served.logprobs for lp in row)


def test_weight_sync_lands_on_the_server(server_url, model, tokenizer, prompts):
    generator = remote(server_url, tokenizer)
    before = generator.generate(prompts).completion_ids
    perturbed = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    try:
        generator.sync_weights(perturbed)
        after = generator.generate(prompts).completion_ids
        assert after == local(perturbed, tokenizer).generate(prompts).completion_ids
        assert after != before
    finally:
        generator.sync_weights(model)
    assert generator.generate(prompts).completion_ids == before


def test_small_chunks_and_bad_updates(server_url, model):
    client = GenerationClient(server_url)
    assert client.update_weights(model.named_parameters(), chunk_bytes=1) == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match="not.a.param"):
        client.update_weights([("not.a.param", torch.zeros(2))])
    with pytest.raises(RuntimeError, match="size mismatch"):
        client.update_weights([("lm_head.weight", torch.zeros(2, 2))])


def test_identical_prompts_are_sent_once_with_n(server_url, model, tokenizer, prompts):
    a, b = prompts[0], prompts[1]
    greedy = remote(server_url, tokenizer).generate([a, a, a, b, b]).completion_ids
    expected = local(model, tokenizer).generate([a, b]).completion_ids
    assert greedy == [expected[0]] * 3 + [expected[1]] * 2
    sampled = remote(server_url, tokenizer, SamplingConfig(max_tokens=8)).generate([a, a, b, b, b, a])
    assert len(sampled.completion_ids) == len(sampled.logprobs) == 6
    client = GenerationClient(server_url)
    assert len(client.generate([a, b], n=[2, 3], sampling=GREEDY).completion_ids) == 5
    with pytest.raises(RuntimeError, match="n must be a positive integer"):
        client.generate([a, b], n=[2])


def test_stop_token_ids_end_completions(server_url, model, tokenizer, prompts):
    free = local(model, tokenizer).generate(prompts[:1]).completion_ids[0]
    stop = free[2]
    served = GenerationClient(server_url).generate(prompts[:1], sampling=GREEDY, stop_token_ids=[stop])
    assert served.completion_ids[0] == free[: free.index(stop) + 1]


def test_make_generator_server_mode(server_url, model, tokenizer, prompts):
    args = SimpleNamespace(
        max_completion_length=8, temperature=0.0, use_vllm=True, vllm_mode="server", vllm_server_base_url=server_url
    )
    generator = make_generator(args, model, tokenizer)
    assert isinstance(generator, VLLMServerGenerator)
    assert generator.generate(prompts).completion_ids == local(model, tokenizer).generate(prompts).completion_ids


def test_unknown_endpoint(server_url):
    with pytest.raises(RuntimeError, match="HTTP 404"):
        GenerationClient(server_url)._request("POST", "/nope/")


def test_a_dead_port_raises_connection_error_within_the_timeout():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"http://127.0.0.1:{port}.*llm-trainer vllm-serve --model"):
        GenerationClient(host="127.0.0.1", port=port, connection_timeout=1.5)
    assert 1.5 <= time.monotonic() - start < 5


WORKER = """
import json, sys
from accelerate import PartialState
from llm_trainer.generation import SamplingConfig, VLLMServerGenerator

url, out = sys.argv[1], sys.argv[2]
state = PartialState(cpu=True)
prompts = json.loads(sys.argv[3])[state.process_index]
generator = VLLMServerGenerator(SamplingConfig(max_tokens=8, temperature=0), base_url=url, accelerator=state)
result = generator.generate(prompts)
with open(f"{out}.{state.process_index}", "w") as f:
    json.dump({"ids": result.completion_ids, "logprobs": result.logprobs, "client": generator.client is not None}, f)
state.wait_for_everyone()
state.destroy_process_group()
"""


def test_main_process_generates_for_all_processes(server_url, model, tokenizer, prompts, tmp_path):
    """Two CPU processes (gloo) with different prompt counts: each gets the completions of its own prompts."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    per_process = [[prompts[0], prompts[0]], [prompts[1], prompts[1], prompts[2]]]
    port, out = free_port(), tmp_path / "result"
    workers = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, str(script), server_url, str(out), json.dumps(per_process)]
        workers.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    expected = local(model, tokenizer).generate([p for part in per_process for p in part]).completion_ids
    results = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]
    assert [r["ids"] for r in results] == [expected[:2], expected[2:]]
    assert [r["client"] for r in results] == [True, False]  # only the main process talks to the server
    assert [len(lp) for lp in results[1]["logprobs"]] == [len(ids) for ids in expected[2:]]


def test_grpo_trains_against_the_server_and_pushes_its_weights_each_step(
    server_url, model, tokenizer, prompts, tmp_path
):
    """`GRPOTrainer(use_vllm=True, vllm_mode="server")`: completions come from the live server, with its sampling
    log-probs driving the importance-sampling correction, and the trained weights reach the server before each
    generation after an optimizer step."""
    from transformers import TrainerCallback

    from llm_trainer import GRPOConfig, GRPOTrainer
    from llm_trainer.testing import zen_dataset

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=0.05,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=server_url,
        seed=1,
    )
    trainer = GRPOTrainer(
        str(model.config._name_or_path),
        length_reward,
        args=args,
        train_dataset=zen_dataset("standard_prompt_only"),
        callbacks=[Snapshot()],
    )
    try:
        trainer.train()
        logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
        assert "sampling/importance_sampling_ratio/mean" in logged  # the server's log-probs reached the loss
        served = remote(server_url, tokenizer).generate(prompts).completion_ids
        after_first_step = copy.deepcopy(model)
        after_first_step.load_state_dict(snapshots[1])
        synced = local(after_first_step, tokenizer).generate(prompts).completion_ids
        assert served == synced
        assert served != local(model, tokenizer).generate(prompts).completion_ids
    finally:
        remote(server_url, tokenizer).sync_weights(model)

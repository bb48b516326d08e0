"""The generation back ends that run without a server: `TransformersGenerator`, weight reading, `make_generator`."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.generation import (
    GenerationResult,
    SamplingConfig,
    TransformersGenerator,
    iter_named_weights,
    make_generator,
)
from llm_trainer.generation.base import consecutive_runs, truncate_at_eos
from llm_trainer.testing import ZEN_OF_PYTHON, get_tokenizer

GREEDY = SamplingConfig(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Prompts of different lengths, so batching needs padding."""
    return [tokenizer(line)["input_ids"] for line in (ZEN_OF_PYTHON[0], ZEN_OF_PYTHON[6], ZEN_OF_PYTHON[12], "Hi")]


def generator(model, tokenizer, sampling=GREEDY, **kwargs):
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    return TransformersGenerator(model, sampling, pad_token_id=tokenizer.pad_token_id, **kwargs)


def eos_biased(model, eos_id: int):
    """A copy of `model` whose lm_head makes `eos_id` the most likely token everywhere."""
    biased = copy.deepcopy(model)
    bias = torch.zeros(model.config.vocab_size)
    bias[eos_id] = 1e4
    biased.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    return biased


def test_left_padding_gives_the_same_greedy_completions_as_one_by_one(model, tokenizer, prompts):
    batched = generator(model, tokenizer).generate(prompts)
    alone = [generator(model, tokenizer).generate([p]).completion_ids[0] for p in prompts]
    assert len({len(p) for p in prompts}) == len(prompts)
    assert batched.completion_ids == alone
    assert batched.logprobs is None
    assert generator(model, tokenizer, batch_size=3).generate(prompts).completion_ids == alone


def test_stops_at_the_first_eos_and_keeps_it(model, tokenizer, prompts):
    free = generator(model, tokenizer).generate(prompts).completion_ids[0]
    # Declare a token the model emits mid-completion an eos: the completion must end right after its first occurrence
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    eos = free[cut]
    result = generator(model, tokenizer, eos_token_id=[tokenizer.eos_token_id, eos]).generate(prompts)
    assert result.completion_ids[0] == free[: cut + 1]
    free_all = generator(model, tokenizer).generate(prompts).completion_ids
    assert result.completion_ids == [truncate_at_eos(c, [eos]) for c in free_all]
    # With pad == eos, the padding of finished rows must not leak into the completions either.
    same_pad = TransformersGenerator(model, GREEDY, pad_token_id=eos, eos_token_id=eos).generate(prompts)
    assert same_pad.completion_ids == result.completion_ids


def test_a_model_biased_to_eos_returns_just_eos(model, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    result = generator(eos_biased(model, eos), tokenizer, SamplingConfig(max_tokens=6)).generate(prompts)
    assert result.completion_ids == [[eos]] * len(prompts)


def test_max_tokens_is_respected(model, tokenizer, prompts):
    torch.manual_seed(0)
    result = generator(model, tokenizer, SamplingConfig(max_tokens=5)).generate(prompts * 3)
    assert len(result.completion_ids) == 12
    for ids in result.completion_ids:
        assert len(ids) == 5 or (len(ids) < 5 and ids[-1] == tokenizer.eos_token_id)


def test_seeded_sampling_is_reproducible(model, tokenizer, prompts):
    sampler = generator(model, tokenizer, SamplingConfig(max_tokens=8, temperature=1.0))

    def sample(seed):
        torch.manual_seed(seed)
        return sampler.generate(prompts).completion_ids

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_generation_config_carries_the_sampling_settings(model, tokenizer):
    sampling = SamplingConfig(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2)
    sampling.generation_kwargs = {"top_k": 3}
    config = generator(model, tokenizer, sampling, eos_token_id=[1, 2], cache_implementation="static")
    config = config.generation_config()
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_p) == (7, True, 0.5, 0.9)
    assert (config.top_k, config.min_p, config.repetition_penalty) == (3, 0.1, 1.2)  # generation_kwargs win
    assert (config.eos_token_id, config.cache_implementation) == ([1, 2], "static")
    assert generator(model, tokenizer).generation_config().do_sample is False


def test_unwrap_is_used_and_training_mode_restored(model, tokenizer, prompts):
    policy = copy.deepcopy(model).train()
    used = eos_biased(policy, tokenizer.eos_token_id).train()
    seen, events = [], []
    used.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))

    @contextlib.contextmanager
    def unwrap():
        events.append("enter")
        yield used
        events.append("exit")

    result = generator(policy, tokenizer, unwrap=unwrap).generate(prompts)
    assert events == ["enter", "exit"]
    assert result.completion_ids == [[tokenizer.eos_token_id]] * len(prompts)  # generated by the unwrapped model
    assert seen and all(state == (False, False) for state in seen)  # eval mode, no grad
    assert used.training and all(m.training for m in used.modules())


def test_logprobs_are_the_processed_sampling_logprobs(model, tokenizer, prompts):
    for sampling in (GREEDY, SamplingConfig(max_tokens=6, temperature=0.7)):
        torch.manual_seed(0)
        result = generator(model, tokenizer, sampling, return_logprobs=True).generate(prompts)
        temperature = sampling.temperature or 1.0
        for prompt, ids, logprobs in zip(prompts, result.completion_ids, result.logprobs):
            assert len(logprobs) == len(ids)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=1e-4)


def test_bad_input_is_rejected(model, tokenizer):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        generator(model, tokenizer).generate([[1, 2], []])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        TransformersGenerator(model, GREEDY, pad_token_id=None, eos_token_id=1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    assert generator(model, tokenizer).generate([]) == GenerationResult([], None)


def test_consecutive_runs_and_truncation():
    assert consecutive_runs([[1], [1], [2], [1], [1], [1]]) == ([[1], [2], [1]], [2, 1, 3])
    assert truncate_at_eos([5, 3, 9, 3], [3]) == [5, 3]
    assert truncate_at_eos([5, 4], [3]) == [5, 4]


def test_sampling_config_from_trl_grpo_config():
    from trl import GRPOConfig

    args = GRPOConfig("unused", bf16=False, use_cpu=True, temperature=0.8, top_k=7, generation_kwargs={"seed": 1})
    sampling = SamplingConfig.from_args(args)
    assert sampling == SamplingConfig(
        max_tokens=512, temperature=0.8, top_p=1.0, top_k=7, min_p=None, generation_kwargs={"seed": 1}
    )
    assert SamplingConfig.from_args(GRPOConfig("unused", bf16=False, use_cpu=True)).top_k == 0


def test_iter_named_weights_reads_every_parameter(model):
    names = [name for name, _ in model.named_parameters()]
    read = {name: tensor.clone() for name, tensor in iter_named_weights(model)}
    assert list(read) == names
    for name, param in model.named_parameters():
        assert torch.equal(read[name], param)


def test_iter_named_weights_merges_a_peft_adapter(model):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    merged = copy.deepcopy(lora).merge_and_unload()
    read = {name: tensor.clone() for name, tensor in iter_named_weights(lora)}
    assert set(read) == {name for name, _ in model.named_parameters()}  # checkpoint names, no adapter tensors
    for name, param in merged.named_parameters():
        torch.testing.assert_close(read[name], param)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(read[q_proj], dict(model.named_parameters())[q_proj])  # the adapter is in
    base = lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(base, dict(model.named_parameters())[q_proj])  # and unmerged afterwards


def grpo_args(**overrides):
    fields = {"max_completion_length": 4, "temperature": 1.0, "use_vllm": False, "vllm_mode": "colocate"}
    return SimpleNamespace(**{**fields, **overrides})


def test_make_generator_defaults_to_transformers(model, tokenizer, prompts):
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    made = make_generator(grpo_args(cache_implementation="dynamic"), model, tokenizer)
    assert isinstance(made, TransformersGenerator)
    assert made.eos_token_ids == [7, tokenizer.eos_token_id]
    assert (made.pad_token_id, made.cache_implementation) == (tokenizer.pad_token_id, "dynamic")
    assert made.sampling.max_tokens == 4
    assert len(made.generate(prompts).completion_ids) == len(prompts)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_colocate_without_vllm_names_the_extra(model, tokenizer):
    with pytest.raises(ImportError, match=r'pip install "llm-trainer\[vllm\]"'):
        make_generator(grpo_args(use_vllm=True, vllm_mode="colocate"), model, tokenizer)


def test_make_generator_rejects_an_unknown_mode(model, tokenizer):
    with pytest.raises(ValueError, match="vllm_mode must be 'server' or 'colocate'"):
        make_generator(grpo_args(use_vllm=True, vllm_mode="remote"), model, tokenizer)


def test_server_mode_needs_no_local_vllm_but_a_server(model, tokenizer):
    args = grpo_args(
        use_vllm=True, vllm_mode="server", vllm_server_base_url="http://127.0.0.1:9", vllm_server_timeout=0
    )
    with pytest.raises(ConnectionError, match="http://127.0.0.1:9"):
        make_generator(args, model, tokenizer)

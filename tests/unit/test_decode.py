"""The lean decode loop (`llm_trainer.generation.decode`): the same tokens as `model.generate` under a seed, the
configured distribution, compaction, shared prefill, and the fallbacks to `generate`."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from llm_trainer.generation import SamplingConfig, TransformersGenerator
from llm_trainer.generation import decode as decode_module
from llm_trainer.generation.decode import decode, plan_from, unsupported_reason
from llm_trainer.testing import ZEN_OF_PYTHON, get_tokenizer, make_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Groups of repeated prompts (as GRPO sends them) of different lengths, plus one unshared prompt."""
    lines = [ZEN_OF_PYTHON[0], ZEN_OF_PYTHON[6], "Hi"]
    ids = [tokenizer(line)["input_ids"] for line in lines]
    return [ids[0]] * 3 + [ids[1]] * 3 + [ids[2]] + [ids[0]]


def eos_leaning(model, token_ids: list[int], bias: float):
    """A copy of `model` whose logits for `token_ids` are raised by `bias` (so completions stop at varied steps)."""
    biased = copy.deepcopy(model)
    shift = torch.zeros(model.config.vocab_size)
    shift[token_ids] = bias
    biased.lm_head.register_forward_hook(lambda module, args, output: output + shift)
    return biased


def both(model, tokenizer, sampling, prompts, eos=None, seed=0, compact_finished=False):
    """(generate's result, the fast loop's result, the fast generator) from the same seed; checks that the random
    stream ends in the same state."""
    eos = eos if eos is not None else [tokenizer.eos_token_id]
    common = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, return_logprobs=True)
    slow = TransformersGenerator(model, sampling, fast=False, **common)
    fast = TransformersGenerator(model, sampling, fast=True, compact_finished=compact_finished, **common)
    torch.manual_seed(seed)
    expected = slow.generate(prompts)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    got = fast.generate(prompts)
    assert fast.fallback_reason is None
    assert torch.equal(torch.get_rng_state(), state), "the fast loop drew a different amount of randomness"
    return expected, got, fast


SAMPLINGS = {
    "plain": SamplingConfig(max_tokens=10),
    "temperature_top_k": SamplingConfig(max_tokens=10, temperature=0.7, top_k=20),
    "top_p": SamplingConfig(max_tokens=10, top_p=0.8),
    "min_p": SamplingConfig(max_tokens=10, temperature=1.3, min_p=0.05),
    "everything": SamplingConfig(
        max_tokens=10, temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, repetition_penalty=1.3
    ),
    "greedy": SamplingConfig(max_tokens=10, temperature=0),
    "greedy_penalty": SamplingConfig(max_tokens=10, temperature=0, repetition_penalty=1.5),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_same_tokens_and_logprobs_as_generate(model, tokenizer, prompts, name):
    expected, got, _ = both(model, tokenizer, SAMPLINGS[name], prompts, seed=7)
    assert got.completion_ids == expected.completion_ids
    for ours, theirs in zip(got.logprobs, expected.logprobs):
        # float32 log-softmax of the same processed scores: equal up to a few ulps of values of order 10
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_eos_stops_rows_at_different_steps_with_several_eos_ids(
    request, model, tokenizer, prompts, compact, architecture
):
    if architecture == "llama":  # tied embeddings, another attention layout
        model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue("tiny_llama_path")).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("!")]
    leaning = eos_leaning(model, stops, bias=4.0)
    sampling = SamplingConfig(max_tokens=12, temperature=0.9, top_k=100, repetition_penalty=1.2)
    expected, got, _ = both(leaning, tokenizer, sampling, prompts * 3, eos=stops, seed=3, compact_finished=compact)
    assert got.completion_ids == expected.completion_ids
    lengths = {len(ids) for ids in got.completion_ids}
    ends = {ids[-1] for ids in got.completion_ids if len(ids) < 12}
    assert len(lengths) > 3 and set(stops) <= ends  # rows stopped at varied steps, at each eos id
    for ours, theirs in zip(got.logprobs, expected.logprobs):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-5)


def test_compaction_runs_fewer_rows_and_samples_the_same_tokens(model, tokenizer, prompts):
    stops = [tokenizer.eos_token_id]
    leaning = eos_leaning(model, stops, bias=4.0)
    sampling = SamplingConfig(max_tokens=16)
    _, full, full_gen = both(leaning, tokenizer, sampling, prompts * 4, eos=stops, seed=5)
    _, compacted, compact_gen = both(
        leaning, tokenizer, sampling, prompts * 4, eos=stops, seed=5, compact_finished=True
    )
    assert compacted.completion_ids == full.completion_ids
    generated = sum(len(ids) for ids in full.completion_ids)
    # without compaction every row runs until the last one stops; with it the model runs on far fewer rows
    assert compact_gen.forward_rows < full_gen.forward_rows
    assert compact_gen.forward_rows <= 2 * generated


def test_each_distinct_prompt_is_prefilled_once(model, tokenizer, prompts):
    never = model.config.vocab_size + 1  # an eos id no row can sample: every row runs all 6 steps
    plan = plan_from(model, config_for(tokenizer, max_new_tokens=6, eos_token_id=[never]))
    torch.manual_seed(0)
    completions, _, rows = decode(model, prompts, plan)
    distinct = len({tuple(p) for p in prompts})
    assert distinct < len(prompts) and all(len(ids) == 6 for ids in completions)
    assert rows == distinct + len(prompts) * 5  # prefill: one row per distinct prompt; then 5 decode steps


def chi_square_bound(dof: int, z: float = 5.0) -> float:
    """The chi-square quantile about `z` standard deviations out (Wilson-Hilferty); p ~ 3e-7 for z=5."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the categories expected at least 5 times (the rest pooled), and its dof."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return float(stat), int(keep.sum()) - 1


@pytest.mark.parametrize("compact", [False, True])
def test_first_and_second_token_frequencies_match_the_configured_distribution(model, tokenizer, compact):
    """On a fixed model, 4000 samples of the first two tokens follow softmax(processed logits): chi-square at a
    ~3e-7 false-alarm level. Rows whose first token is eos (about 30%) stop, and leave the batch when compacting."""
    eos = tokenizer.eos_token_id
    leaning = eos_leaning(model, [eos], bias=1.5)
    prompt = tokenizer(ZEN_OF_PYTHON[2])["input_ids"]
    sampling = SamplingConfig(max_tokens=2, temperature=0.8, top_k=12)
    generator = TransformersGenerator(
        leaning, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, compact_finished=compact
    )
    torch.manual_seed(0)
    completions = generator.generate([prompt] * 4000).completion_ids
    assert generator.fallback_reason is None

    def processed_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = leaning(torch.tensor([ids])).logits[0, -1] / 0.8
        top = torch.topk(logits, 12)
        probs = torch.zeros_like(logits)
        probs[top.indices] = torch.softmax(top.values, dim=-1)
        return probs

    vocab = model.config.vocab_size
    first = torch.bincount(torch.tensor([ids[0] for ids in completions]), minlength=vocab).double()
    stat, dof = chi_square(first, processed_probs(prompt).double())
    assert dof >= 4 and stat < chi_square_bound(dof)
    assert 0 < first[eos] < len(completions)  # some rows stopped after one token
    common = int(torch.where(torch.arange(vocab) == eos, 0.0, first).argmax())
    second = [ids[1] for ids in completions if ids[0] == common]
    counts = torch.bincount(torch.tensor(second), minlength=vocab).double()
    stat, dof = chi_square(counts, processed_probs(prompt + [common]).double())
    assert len(second) > 150 and dof >= 2 and stat < chi_square_bound(dof)


def test_the_cpu_noise_is_exponential_bit_for_bit():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    reference = torch.empty(5, 1000).exponential_(1)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    assert torch.equal(decode_module._cpu_negated_exponential((5, 1000)).neg(), reference)
    assert torch.equal(torch.get_rng_state(), after)
    assert decode_module._noise_kind(torch.device("cpu")) == "cpu"


def config_for(tokenizer, **kwargs) -> GenerationConfig:
    base = dict(max_new_tokens=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])
    return GenerationConfig(**{**base, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs})


def test_supported_configs_have_no_reason(model, tokenizer):
    assert unsupported_reason(model, config_for(tokenizer)) is None
    assert unsupported_reason(model, config_for(tokenizer, repetition_penalty=1.2, min_p=0.1)) is None
    assert unsupported_reason(model, config_for(tokenizer), extra_kwargs=["temperature", "top_k"]) is None


def test_unsupported_setups_name_their_reason(model, tokenizer):
    assert "generation_kwargs sets no_repeat_ngram_size" in unsupported_reason(
        model, config_for(tokenizer, no_repeat_ngram_size=2), extra_kwargs=["no_repeat_ngram_size"]
    )
    assert "cache_implementation='static'" in unsupported_reason(
        model, config_for(tokenizer, cache_implementation="static")
    )
    assert "sharded" in unsupported_reason(model, config_for(tokenizer), lockstep=True)
    assert "num_beams=2" in unsupported_reason(model, config_for(tokenizer, num_beams=2, do_sample=False))
    with_model_default = copy.deepcopy(model)
    with_model_default.generation_config.suppress_tokens = [5]
    assert "suppress_tokens" in unsupported_reason(with_model_default, config_for(tokenizer))


def test_encoder_decoder_falls_back():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
    seq2seq = T5ForConditionalGeneration(config)
    reason = unsupported_reason(seq2seq, GenerationConfig(max_new_tokens=2, pad_token_id=0, eos_token_id=1))
    assert "encoder-decoder" in reason


def test_generator_falls_back_with_the_same_result_and_says_why_once(model, tokenizer, prompts, caplog):
    sampling = SamplingConfig(max_tokens=5, generation_kwargs={"no_repeat_ngram_size": 2})
    slow = TransformersGenerator(model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=2, fast=False)
    fast = TransformersGenerator(model, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=2)
    torch.manual_seed(1)
    expected = slow.generate(prompts).completion_ids
    with caplog.at_level(logging.WARNING, logger="llm_trainer.generation.transformers_backend"):
        torch.manual_seed(1)
        got = fast.generate(prompts).completion_ids
        fast.generate(prompts)
    assert got == expected
    assert fast.fallback_reason == "generation_kwargs sets no_repeat_ngram_size"
    warnings = [r for r in caplog.records if "no_repeat_ngram_size" in r.getMessage()]
    assert len(warnings) == 1


def test_sliding_window_cache_falls_back_before_sampling(tmp_path, tokenizer, prompts):
    path = make_tiny_model(tmp_path / "sliding", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    sliding = AutoModelForCausalLM.from_pretrained(path).eval()
    sampling = SamplingConfig(max_tokens=5)
    slow = TransformersGenerator(sliding, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=2, fast=False)
    fast = TransformersGenerator(sliding, sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=2)
    torch.manual_seed(2)
    expected = slow.generate(prompts).completion_ids
    torch.manual_seed(2)
    assert fast.generate(prompts).completion_ids == expected
    assert "cache layer 0" in fast.fallback_reason


def test_factory_reads_the_fast_generation_fields(model, tokenizer):
    from types import SimpleNamespace

    from llm_trainer.generation import make_generator

    args = SimpleNamespace(max_completion_length=4, fast_generation=False, generation_compact_finished=True)
    made = make_generator(args, model, tokenizer)
    assert (made.fast, made.compact_finished) == (False, True)
    made = make_generator(SimpleNamespace(max_completion_length=4), model, tokenizer)
    assert (made.fast, made.compact_finished) == (True, True)


def test_lora_model_samples_the_same_tokens(model, tokenizer, prompts):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for module in lora.modules():  # non-zero adapters, so that they change the logits
        if hasattr(module, "lora_B"):
            for weight in module.lora_B.values():
                torch.nn.init.normal_(weight.weight, std=0.5)
    expected, got, _ = both(lora, tokenizer, SamplingConfig(max_tokens=6, top_k=40), prompts, seed=4)
    assert got.completion_ids == expected.completion_ids


def test_nan_logits_raise_as_generate_does(model, tokenizer, prompts):
    broken = copy.deepcopy(model)
    broken.lm_head.register_forward_hook(lambda module, args, output: output * float("nan"))
    fast = TransformersGenerator(
        broken, SamplingConfig(max_tokens=3), pad_token_id=tokenizer.pad_token_id, eos_token_id=2
    )
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        fast.generate(prompts)
    slow = TransformersGenerator(
        broken, SamplingConfig(max_tokens=3), pad_token_id=tokenizer.pad_token_id, eos_token_id=2, fast=False
    )
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        slow.generate(prompts)


def test_cache_buffers_grow_and_compact_without_changing_tokens(model, tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(decode_module, "_GROWTH", 3)  # buffers grow every 3 positions
    stops = [tokenizer.eos_token_id]
    leaning = eos_leaning(model, stops, bias=3.0)
    sampling = SamplingConfig(max_tokens=14, top_k=50)
    expected, got, _ = both(leaning, tokenizer, sampling, prompts * 2, eos=stops, seed=9, compact_finished=True)
    assert got.completion_ids == expected.completion_ids
    assert max(len(ids) for ids in got.completion_ids) > 6

"""WinRateCallback and MergeModelCallback on tiny offline training runs: the judge sees [reference, policy] pairs
and the logged win rate is its verdict; the merged model saved with the checkpoint is the PEFT model's merge, and the
training model keeps its adapter."""

from __future__ import annotations

import copy
import importlib.util
import os

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llm_trainer import DPOConfig, DPOTrainer, MergeModelCallback, SFTConfig, SFTTrainer, WinRateCallback
from llm_trainer.experimental.merge_model_callback import MergeConfig
from llm_trainer.judges import BasePairwiseJudge
from llm_trainer.testing import zen_dataset

GENERATION = GenerationConfig(max_new_tokens=6, do_sample=False)
NUM_PROMPTS = 4


class ScriptedJudge(BasePairwiseJudge):
    """Prefers the policy (index 1) for the first `policy_wins` pairs and the reference (index 0) for the rest; with
    `return_scores` it answers `scores`, the probability that the reference wins. Records every call."""

    def __init__(self, policy_wins: int = 0, scores: list[float] | None = None):
        self.policy_wins, self.scores, self.calls = policy_wins, scores, []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.calls.append((list(prompts), [list(pair) for pair in completions], shuffle_order, return_scores))
        if return_scores:
            return list(self.scores)
        return [1 if i < self.policy_wins else 0 for i in range(len(prompts))]


def _common(tmp_path, **kwargs) -> dict:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        learning_rate=5e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    return {**defaults, **kwargs}


def _greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    """Reference decoding, one prompt at a time."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            generated = model.generate(**ids, generation_config=GENERATION)
        out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


# ------------------------------------------------------------------------------------------------------ win rate
def test_win_rate_in_dpo_compares_the_frozen_reference_with_the_policy(tiny_model_path, tmp_path):
    eval_dataset = zen_dataset("standard_preference").select(range(6))
    args = DPOConfig(**_common(tmp_path, eval_strategy="steps", eval_steps=2))
    trainer = DPOTrainer(
        model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_preference"), eval_dataset=eval_dataset
    )
    judge = ScriptedJudge(policy_wins=1)
    callback = WinRateCallback(judge, trainer, generation_config=GENERATION, num_prompts=NUM_PROMPTS)
    trainer.add_callback(callback)
    trainer.train()

    win_logs = [log for log in trainer.state.log_history if "eval_win_rate" in log]
    assert [log["eval_win_rate"] for log in win_logs] == [1 / NUM_PROMPTS]
    assert "eval_avg_win_prob" not in win_logs[0]
    prompts, pairs, shuffle_order, return_scores = judge.calls[-1]
    assert prompts == eval_dataset["prompt"][:NUM_PROMPTS] and shuffle_order and not return_scores
    # The reference side is the initial model's greedy answer, the policy side the trained model's
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert [ref for ref, _ in pairs] == _greedy(initial, tokenizer, prompts)
    assert [policy for _, policy in pairs] == _greedy(trainer.model.eval(), tokenizer, prompts)
    assert [ref for ref, _ in pairs] != [policy for _, policy in pairs]  # training changed the answers


def test_soft_judge_with_peft_sft_uses_the_disabled_adapter_as_reference(tiny_model_path, tmp_path):
    eval_dataset = zen_dataset("standard_prompt_completion").select(range(NUM_PROMPTS))
    args = SFTConfig(**_common(tmp_path, eval_strategy="steps", eval_steps=1))
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_prompt_completion"),
        eval_dataset=eval_dataset,
        peft_config=lora,
    )
    scores = [0.2, 0.7, 0.4, 0.9]  # P(reference wins): the policy wins pairs 0 and 2
    judge = ScriptedJudge(scores=scores)
    callback = WinRateCallback(judge, trainer, generation_config=GENERATION, shuffle_order=False, use_soft_judge=True)
    trainer.add_callback(callback)
    trainer.train()

    win_logs = [log for log in trainer.state.log_history if "eval_win_rate" in log]
    assert len(win_logs) == 2
    for log in win_logs:
        assert log["eval_win_rate"] == 0.5
        assert log["eval_avg_win_prob"] == pytest.approx(1 - sum(scores) / len(scores), rel=1e-12)
    prompts, pairs, shuffle_order, return_scores = judge.calls[-1]
    assert not shuffle_order and return_scores
    # init_lora_weights=False: the adapter changes the model from the start, so the reference (adapter disabled) is
    # the base model, not the policy
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert [ref for ref, _ in pairs] == _greedy(base, tokenizer, prompts)
    assert [ref for ref, _ in pairs] != [policy for _, policy in pairs]
    assert [policy for _, policy in pairs] == _greedy(trainer.model.eval(), tokenizer, prompts)
    assert isinstance(trainer.model, peft.PeftModel)


def test_win_rate_rejects_what_is_not_a_pairwise_judge(tiny_model_path, tmp_path):
    args = SFTConfig(**_common(tmp_path))
    data = zen_dataset("standard_prompt_completion")
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=data, eval_dataset=data)
    with pytest.raises(TypeError, match="pairwise judge"):
        WinRateCallback(lambda prompts, pairs: [1] * len(prompts), trainer)
    with pytest.raises(ValueError, match="evaluation dataset"):
        WinRateCallback(ScriptedJudge(), SFTTrainer(model=tiny_model_path, args=args, train_dataset=data))


# ----------------------------------------------------------------------------------------------------- merging
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("every_checkpoint", [True, False])
def test_merge_model_callback_saves_the_merged_peft_model(tiny_model_path, tmp_path, every_checkpoint):
    save = dict(save_strategy="steps", save_steps=1) if every_checkpoint else {}
    args = SFTConfig(**_common(tmp_path, **save))
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    callback = MergeModelCallback(merge_at_every_checkpoint=every_checkpoint)
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_prompt_completion"),
        peft_config=lora,
        callbacks=[callback],
    )
    trainer.train()

    steps = [1, 2] if every_checkpoint else [2]
    expected = [os.path.join(tmp_path, f"checkpoint-{step}", "merged") for step in steps]
    assert callback.merged_paths == expected
    # The training model keeps its adapter, which training moved away from the base
    assert isinstance(trainer.model, peft.PeftModel)
    model = trainer.model.eval()
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device=model.device)
    reference = _logits(copy.deepcopy(model).merge_and_unload(), input_ids)
    merged = AutoModelForCausalLM.from_pretrained(expected[-1]).to(model.device).eval()
    assert not isinstance(merged, peft.PeftModel)
    assert AutoTokenizer.from_pretrained(expected[-1]).eos_token == trainer.processing_class.eos_token
    scale = reference.abs().max().item()
    torch.testing.assert_close(_logits(merged, input_ids), reference, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(_logits(model, input_ids), reference, rtol=1e-4, atol=1e-5 * scale)
    with model.disable_adapter():
        assert (_logits(model, input_ids) - reference).abs().max().item() > 1e-3 * scale


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is not None, reason="mergekit is installed")
def test_merging_a_full_model_without_mergekit_fails_before_training(tiny_model_path, tmp_path):
    args = SFTConfig(**_common(tmp_path))
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_prompt_completion"),
        callbacks=[MergeModelCallback()],
    )
    with pytest.raises(ImportError, match="pip install mergekit"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_merge_config_defaults_and_bad_input():
    ties = MergeConfig("ties")
    assert (ties.policy_model_density, ties.normalize, ties.dtype) == ([1.0, 0.7, 0.1], 1.0, "float16")
    assert MergeConfig("slerp").t_values == 0.5
    assert MergeConfig().policy_model_weight == MergeConfig().target_model_weight == 0.5
    with pytest.raises(ValueError, match="Unsupported merge method"):
        MergeConfig("average")
    with pytest.raises(ValueError, match="for the 'ties' method"):
        ties.create_merge_config_slerp()
    if importlib.util.find_spec("mergekit") is None:
        with pytest.raises(ImportError, match="pip install mergekit"):
            ties.create_merge_config_ties()
    with pytest.raises(TypeError, match="MergeConfig"):
        MergeModelCallback(merge_config={"method": "linear"})

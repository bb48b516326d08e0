"""GRPOTrainer and RLOOTrainer parity with TRL 1.16: the same tiny model, prompts, reward functions and seed through
both give the same completions, rewards, advantages, losses and metrics, step by step."""

from __future__ import annotations

import pytest

from llm_trainer.testing import zen_dataset

from .helpers import assert_close_metrics, assert_same_training

trl = pytest.importorskip("trl")


def length_reward(completions, **kwargs):
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10 for c in completions]


def vowel_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [None if not t else sum(ch in "aeiou" for ch in t) / len(t) for t in texts]


# The loss (≈ 0 on-policy) averages advantage × ratio per token: advantages are group-normalized (|A| ≲ 1.5 for 4
# generations) or, for RLOO, differences of rewards that lie within ~1 of each other, so its float32 rounding is that
# of O(1) terms (see helpers.rounding_scale).
LOSS_SCALE = 1.0


def _train(module, trainer_name, model_path, dataset, tmp_path, trainer_kwargs=None, **config):
    config = {
        "output_dir": str(tmp_path / f"{module.__name__}-{trainer_name}"),
        "report_to": "none",
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 11,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        **config,
    }
    config_class = getattr(module, f"{trainer_name}Config")
    trainer_class = getattr(module, f"{trainer_name}Trainer")
    trainer = trainer_class(
        model=model_path,
        reward_funcs=[length_reward, vowel_reward],
        args=config_class(**config),
        train_dataset=dataset,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    return trainer


def _assert_parity(
    trainer_name, tiny_model_path, tmp_path, config_name="standard_prompt_only", trainer_kwargs=None, **config
):
    import llm_trainer

    dataset = zen_dataset(config_name)
    ours = _train(llm_trainer, trainer_name, tiny_model_path, dataset, tmp_path, trainer_kwargs, **config)
    theirs = _train(trl, trainer_name, tiny_model_path, dataset, tmp_path, trainer_kwargs, **config)
    assert list(ours._logs["completion"]) == list(theirs._logs["completion"])
    assert_same_training(ours, theirs, loss_scale=LOSS_SCALE)
    return ours, theirs


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"config_name": "conversational_prompt_only", "beta": 0.04, "loss_type": "grpo"},
        {"gradient_accumulation_steps": 2, "num_iterations": 2, "per_device_train_batch_size": 2},
        {"loss_type": "dr_grpo", "scale_rewards": "batch", "reward_weights": [1.0, 3.0]},
        {"importance_sampling_level": "sequence", "loss_type": "grpo", "top_entropy_quantile": 0.5},
        {"multi_objective_aggregation": "normalize_then_sum", "mask_truncated_completions": True},
        {"entropy_coef": 0.01, "loss_type": "cispo"},
    ],
    ids=[
        "default",
        "conversational-kl",
        "accumulation-iterations",
        "dr_grpo",
        "gspo-entropy-mask",
        "normalize",
        "cispo",
    ],
)
def test_grpo_matches_trl(tiny_model_path, tmp_path, config):
    _assert_parity("GRPO", tiny_model_path, tmp_path, **config)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta": 0.0, "normalize_advantages": True},
        {"config_name": "conversational_prompt_only", "reward_clip_range": (0.0, 0.8)},
    ],
    ids=["default", "no-kl-normalized", "conversational-clipped"],
)
def test_rloo_matches_trl(tiny_model_path, tmp_path, config):
    _assert_parity("RLOO", tiny_model_path, tmp_path, **config)


def test_grpo_with_lora_matches_trl(tiny_model_path, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _assert_parity("GRPO", tiny_model_path, tmp_path, trainer_kwargs={"peft_config": lora}, beta=0.04)


def scripted_rollout(prompts, trainer):
    """A `rollout_func` that needs no sampling: each completion is the prompt's first tokens, cut to its row index."""
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    completion_ids = [ids[: 2 + i % 4] for i, ids in enumerate(prompt_ids)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "turn": [1] * len(prompts)}


def test_grpo_with_a_rollout_func_matches_trl(tiny_model_path, tmp_path):
    _assert_parity("GRPO", tiny_model_path, tmp_path, trainer_kwargs={"rollout_func": scripted_rollout})


def test_grpo_evaluation_matches_trl(tiny_model_path, tmp_path):
    import llm_trainer

    config = {"per_device_eval_batch_size": 4, "num_generations_eval": 2, "max_steps": 1}
    results = []
    for module in (llm_trainer, trl):
        trainer = _train(module, "GRPO", tiny_model_path, zen_dataset("standard_prompt_only"), tmp_path, **config)
        results.append(trainer.evaluate(zen_dataset("standard_prompt_only", "test")))
    ours, theirs = results
    assert set(ours) == set(theirs) and "eval_reward" in ours
    keys = sorted(set(ours) - {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_step_time"})
    assert_close_metrics(ours, theirs, keys, rtol=1e-4, loss_scale=LOSS_SCALE)

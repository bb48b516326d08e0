"""RewardTrainer parity with TRL 1.16: same tiny reward model, data and seed through both; per-step loss within 1e-4
and the same metric names and values."""

from __future__ import annotations

import pytest
from datasets import Dataset

from llm_trainer.testing import make_tiny_model, zen_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-seqcls"), task="sequence-classification")


def _train(module, model_path, dataset, tmp_path, peft_config=None, **config):
    config = {
        "output_dir": str(tmp_path / module.__name__),
        "report_to": "none",
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 7,
        **config,
    }
    trainer = module.RewardTrainer(
        model=model_path, args=module.RewardConfig(**config), train_dataset=dataset, peft_config=peft_config
    )
    trainer.train()
    return trainer


def _with_margin(dataset: Dataset) -> Dataset:
    return dataset.add_column("margin", [0.1 * (i % 4) for i in range(len(dataset))])


CASES = {
    "implicit_prompt": ("standard_implicit_prompt_preference", False, {}),
    "explicit_prompt": ("standard_preference", False, {}),
    "conversational_implicit_prompt": ("conversational_implicit_prompt_preference", False, {}),
    "conversational_explicit_prompt": ("conversational_preference", False, {}),
    "margin": ("standard_implicit_prompt_preference", True, {}),
    "center_rewards": ("standard_implicit_prompt_preference", False, {"center_rewards_coefficient": 0.01}),
    "margin_and_center_rewards": ("standard_preference", True, {"center_rewards_coefficient": 0.1}),
    "filter_long_pairs": ("standard_implicit_prompt_preference", False, {"max_length": 20}),
    "grad_accumulation_2": (
        "standard_implicit_prompt_preference",
        False,
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reward_matches_trl(case, reward_model_path, tmp_path):
    import llm_trainer

    config_name, margin, config = CASES[case]
    dataset = zen_dataset(config_name)
    if margin:
        dataset = _with_margin(dataset)
    ours = _train(llm_trainer, reward_model_path, dataset, tmp_path, **config)
    theirs = _train(trl, reward_model_path, dataset, tmp_path, **config)
    assert len(ours.train_dataset) == len(theirs.train_dataset)
    if "max_length" in config:
        assert len(ours.train_dataset) < len(dataset)  # over-long pairs were dropped, not truncated
    assert_same_training(ours, theirs)


def test_reward_from_causal_lm_checkpoint_matches_trl(tiny_model_path, tmp_path):
    """A causal LM path loads as a sequence classifier with a fresh, seeded score head, as in TRL."""
    import llm_trainer

    dataset = zen_dataset("standard_implicit_prompt_preference")
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path)
    assert_same_training(ours, theirs)


def test_reward_lora_matches_trl(reward_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    import llm_trainer

    dataset = zen_dataset("standard_implicit_prompt_preference")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    ours = _train(llm_trainer, reward_model_path, dataset, tmp_path, peft.LoraConfig(**lora))
    theirs = _train(trl, reward_model_path, dataset, tmp_path, peft.LoraConfig(**lora))
    assert_same_training(ours, theirs)

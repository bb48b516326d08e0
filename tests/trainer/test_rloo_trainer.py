"""RLOOTrainer on the tiny offline model: training moves the policy, the KL penalty sits in the reward, TRL's metric
names are logged, and a learning test on a verifiable reward."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from llm_trainer import RLOOConfig, RLOOTrainer
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset

RLOO_METRICS = {
    "num_tokens",
    "completions/mean_length",
    "completions/clipped_ratio",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
}


def _config(tmp_path, **kwargs) -> RLOOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=5,
    )
    return RLOOConfig(**{**defaults, **kwargs})


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def test_training_moves_the_policy_and_logs_trl_metrics(tiny_model_path, tmp_path):
    trainer = RLOOTrainer(
        tiny_model_path, length_reward, args=_config(tmp_path), train_dataset=zen_dataset("conversational_prompt_only")
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(before.values(), trainer.ref_model.parameters()))
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert RLOO_METRICS | {"rewards/length_reward/mean"} <= set(logged)


def test_leave_one_out_advantages_and_kl_in_the_reward(tiny_model_path, tmp_path):
    rewards = iter([[1.0, 2.0, 3.0, 6.0]])

    def fixed(completions, **kwargs):
        return next(rewards)

    trainer = RLOOTrainer(
        tiny_model_path,
        fixed,
        args=_config(tmp_path, max_steps=1, beta=0.0),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    trainer.train()
    advantages = sorted(trainer._logs["advantages"])
    # A_i = r_i - mean of the other three: 1-11/3, 2-10/3, 3-3, 6-2
    assert advantages == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])


@pytest.mark.slow
def test_rloo_learns_to_say_seven(tmp_path):
    path = make_tiny_model(tmp_path / "policy", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    dataset = Dataset.from_dict({"prompt": [f"Count: {i}" for i in range(64)]})
    args = _config(
        tmp_path / "out",
        max_steps=40,
        per_device_train_batch_size=16,
        num_generations=8,
        learning_rate=3e-2,
        gradient_checkpointing=False,
        logging_steps=5,
        seed=0,
        beta=0.0,
    )

    def sevens(completions, **kwargs):
        return [float(text.count("7")) for text in completions]

    trainer = RLOOTrainer(path, sevens, args=args, train_dataset=dataset, processing_class=get_tokenizer())
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert rewards[-1] > max(4 * rewards[0], rewards[0] + 1.0), rewards

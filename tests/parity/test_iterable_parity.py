"""Streamed prompts (`IterableDataset`) parity with TRL 1.16: GRPO, RLOO and distillation read the stream in the same
(buffer-shuffled, repeated) order as TRL, so they give the same completions, losses and metrics step by step."""

from __future__ import annotations

import pytest

from llm_trainer.testing import make_tiny_model, zen_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")

COMMON = {
    "report_to": "none",
    "max_steps": 3,
    "max_completion_length": 8,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "bf16": False,
    "save_strategy": "no",
    "seed": 11,
    "disable_tqdm": True,
    "dataloader_pin_memory": False,
}


def length_reward(completions, **kwargs):
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10 for c in completions]


def _online(module, trainer_name, model_path, config_name, output_dir, **config):
    config = {
        "output_dir": str(output_dir),
        **COMMON,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        **config,
    }
    trainer = getattr(module, f"{trainer_name}Trainer")(
        model=model_path,
        reward_funcs=length_reward,
        args=getattr(module, f"{trainer_name}Config")(**config),
        train_dataset=zen_dataset(config_name).to_iterable_dataset(),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("trainer_name", "config"),
    [
        ("GRPO", {}),
        ("GRPO", {"config_name": "conversational_prompt_only", "gradient_accumulation_steps": 2, "num_iterations": 2}),
        ("GRPO", {"shuffle_dataset": False, "per_device_train_batch_size": 2, "steps_per_generation": 2}),
        ("RLOO", {"beta": 0.0}),
    ],
    ids=["grpo", "grpo-conversational-accumulation-iterations", "grpo-unshuffled", "rloo"],
)
def test_online_rl_on_a_stream_matches_trl(trainer_name, config, tiny_model_path, tmp_path):
    import llm_trainer

    config = dict(config)
    config_name = config.pop("config_name", "standard_prompt_only")
    ours = _online(llm_trainer, trainer_name, tiny_model_path, config_name, tmp_path / "ours", **config)
    theirs = _online(trl, trainer_name, tiny_model_path, config_name, tmp_path / "trl", **config)
    assert list(ours._logs["prompt"]) == list(theirs._logs["prompt"])
    assert list(ours._logs["completion"]) == list(theirs._logs["completion"])
    # The loss (≈ 0 on-policy) averages advantage × ratio per token, O(1) terms (see test_grpo_rloo_parity.LOSS_SCALE)
    assert_same_training(ours, theirs, loss_scale=1.0)


def test_distillation_on_a_stream_matches_trl(tiny_model_path, tmp_path):
    import llm_trainer

    teacher = make_tiny_model(tmp_path / "teacher", seed=1, hidden_size=48)
    config = {**COMMON, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "log_completions": True}
    runs = []
    for module in (llm_trainer, trl):
        trainer = module.DistillationTrainer(
            model=tiny_model_path,
            teacher_model=teacher,
            args=module.DistillationConfig(output_dir=str(tmp_path / module.__name__), **config),
            train_dataset=zen_dataset("conversational_prompt_only").to_iterable_dataset(),
        )
        trainer.train()
        runs.append(trainer)
    ours, theirs = runs
    assert list(ours._logs["prompt"]) == list(theirs._logs["prompt"])
    assert list(ours._logs["completion"]) == list(theirs._logs["completion"])
    # The loss is a divergence (→ 0 as the student nears the teacher) of per-token log-probs ≈ −entropy in size
    assert_same_training(ours, theirs, rtol=1e-4, loss_scale="entropy")

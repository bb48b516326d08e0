"""GRPO, RLOO and distillation on streamed prompts (`IterableDataset`): training moves the model and logs TRL's
metrics, prompts stay in groups, evaluation streams too, and the loader settings a stream needs are enforced."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import IterableDataset

from llm_trainer import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from llm_trainer.testing import make_tiny_model, zen_dataset
from llm_trainer.trainer.distillation_config import DistillationConfig
from llm_trainer.trainer.distillation_trainer import DistillationTrainer

COMMON = dict(
    report_to="none",
    max_steps=2,
    per_device_train_batch_size=4,
    max_completion_length=6,
    learning_rate=1e-2,
    logging_steps=1,
    bf16=False,
    save_strategy="no",
    disable_tqdm=True,
    dataloader_pin_memory=False,
    seed=3,
)


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def _step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _stream(config_name: str = "standard_prompt_only", split: str = "train") -> IterableDataset:
    return zen_dataset(config_name, split).to_iterable_dataset()


@pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
def test_grpo_trains_on_a_stream_in_groups(tiny_model_path, tmp_path, config_name, caplog):
    seen = []

    def recording_reward(completions, prompts, **kwargs):
        seen.append(prompts)
        return length_reward(completions)

    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, dataloader_num_workers=2, **COMMON)
    with caplog.at_level(logging.WARNING):
        trainer = GRPOTrainer(tiny_model_path, recording_reward, args=args, train_dataset=_stream(config_name))
    assert "`dataloader_num_workers=0` (not 2)" in caplog.text
    assert args.dataloader_num_workers == 0 and args.accelerator_config.dispatch_batches is False
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    logs = _step_logs(trainer)
    assert len(logs) == 2
    assert {"reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length"} <= set(logs[0])
    # one generation per step: one prompt repeated num_generations times, in the order of the stream shuffled by seed
    shuffled = [row["prompt"] for row in _stream(config_name).shuffle(seed=3).take(2)]
    assert seen == [[prompt] * 4 for prompt in shuffled]


def test_grpo_stream_without_features_and_streamed_evaluation(tiny_model_path, tmp_path):
    rows = zen_dataset("standard_prompt_only").to_list()
    stream = IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_eval_batch_size=4, **COMMON)
    trainer = GRPOTrainer(
        tiny_model_path, length_reward, args=args, train_dataset=stream, eval_dataset={"zen": _stream(split="test")}
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_zen_loss", "eval_reward", "eval_completions/mean_length"} <= set(metrics)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        GRPOTrainer(
            tiny_model_path,
            length_reward,
            args=args,
            train_dataset=IterableDataset.from_generator(lambda: iter([{"question": "hi"}])),
        )


def test_rloo_trains_on_a_stream(tiny_model_path, tmp_path):
    args = RLOOConfig(output_dir=str(tmp_path), num_generations=2, **COMMON)
    trainer = RLOOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_stream())
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    assert len(_step_logs(trainer)) == 2


def test_distillation_trains_on_a_stream(tiny_model_path, tmp_path):
    teacher = make_tiny_model(tmp_path / "teacher", seed=1, hidden_size=48)
    config = {**COMMON, "per_device_train_batch_size": 2}
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), teacher_model_init_kwargs={"dtype": "float32"}, **config
    )
    trainer = DistillationTrainer(
        model=tiny_model_path, teacher_model=teacher, args=args, train_dataset=_stream("conversational_prompt_only")
    )
    before = _params(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model)
    logs = _step_logs(trainer)
    assert len(logs) == 2 and {"entropy", "completions/mean_length"} <= set(logs[0])


def test_dispatched_batches_are_refused_for_a_stream(tiny_model_path, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path), num_generations=4, accelerator_config={"dispatch_batches": True}, **COMMON
    )
    with pytest.raises(ValueError, match="require `dispatch_batches=False`"):
        GRPOTrainer(tiny_model_path, length_reward, args=args, train_dataset=_stream())
    with pytest.raises(ValueError, match="require `dispatch_batches=False`"):
        GRPOTrainer(
            tiny_model_path,
            length_reward,
            args=args,
            train_dataset=zen_dataset("standard_prompt_only"),
            eval_dataset=_stream(split="test"),
        )

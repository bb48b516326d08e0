"""The logged `num_tokens` (training tokens seen so far) continues across a resume from a checkpoint instead of
restarting at 0 (as TRL's does), so the resumed run logs what the uninterrupted one does."""

from __future__ import annotations

import os

import pytest

from llm_trainer import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from llm_trainer.testing import zen_dataset

TRAINERS = {
    "sft": (SFTTrainer, SFTConfig, "standard_language_modeling"),
    "dpo": (DPOTrainer, DPOConfig, "standard_preference"),
}


def _trainer(name: str, model_path: str, output_dir: str):
    trainer_cls, config_cls, dataset = TRAINERS[name]
    args = config_cls(
        output_dir=output_dir,
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        bf16=False,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return trainer_cls(model=model_path, args=args, train_dataset=zen_dataset(dataset))


def _step_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_num_tokens_continues_across_resume(name, tiny_model_path, tmp_path):
    uninterrupted = _trainer(name, tiny_model_path, str(tmp_path / "a"))
    uninterrupted.train()
    expected = _step_logs(uninterrupted)

    resumed = _trainer(name, tiny_model_path, str(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "a", "checkpoint-2"))
    actual = _step_logs(resumed)

    assert 0 < expected[2]["num_tokens"] < expected[3]["num_tokens"]
    assert actual[3]["num_tokens"] == expected[3]["num_tokens"]
    assert actual[3]["loss"] == pytest.approx(expected[3]["loss"], abs=1e-6)

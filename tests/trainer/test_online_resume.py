"""Resuming GRPO / RLOO from a checkpoint taken while a generation batch is still being consumed (steps_per_generation
x num_iterations > 1) continues exactly as the uninterrupted run: the buffered generations are saved with the
checkpoint and reused, where TRL samples new ones."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from llm_trainer import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from llm_trainer.generation.loop import GENERATION_BUFFER_NAME
from llm_trainer.testing import zen_dataset

TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}
UNTIMED = {"step_time"}  # wall-clock, differs run to run


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(name: str, model_path: str, output_dir: str):
    trainer_cls, config_cls = TRAINERS[name]
    args = config_cls(
        output_dir=output_dir,
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,  # steps_per_generation = 2: one generation batch per two optimizer steps
        num_iterations=2,
        beta=0.1,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        bf16=False,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return trainer_cls(model_path, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))


def _step_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def _max_diff(expected: dict[int, dict], actual: dict[int, dict], steps: range) -> float:
    """The largest difference between two runs' logged values over `steps` (inf when they log different keys)."""
    worst = 0.0
    for step in steps:
        keys = set(expected[step]) - UNTIMED
        if keys != set(actual[step]) - UNTIMED:
            return math.inf
        for key in keys:
            a, b = expected[step][key], actual[step][key]
            if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
                worst = max(worst, abs(a - b) if a is not None and b is not None else math.inf)
    return worst


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def uninterrupted(request, tiny_model_path, tmp_path_factory):
    """A three-step run saving every step; generations are sampled at steps 1 and 3 and reused at step 2."""
    output_dir = str(tmp_path_factory.mktemp(f"uninterrupted-{request.param}"))
    trainer = _trainer(request.param, tiny_model_path, output_dir)
    trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return request.param, output_dir, _step_logs(trainer), params


def test_resuming_mid_buffer_reproduces_the_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path):
    name, output_dir, expected, params = uninterrupted
    buffer = GENERATION_BUFFER_NAME.format(0)
    assert os.path.isfile(os.path.join(output_dir, "checkpoint-1", buffer))  # mid-buffer: saved
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-2", buffer))  # used up: nothing to save

    trainer = _trainer(name, tiny_model_path, str(tmp_path))
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-1"))

    actual = _step_logs(trainer)
    assert _max_diff(expected, actual, range(2, 4)) == 0.0  # loss, kl, ... at step 2; reward, num_tokens, ... at 3
    assert actual[3]["num_tokens"] == expected[3]["num_tokens"] > expected[1]["num_tokens"]
    assert all(torch.equal(p, params[n]) for n, p in trainer.model.named_parameters())


def test_resuming_without_the_buffer_diverges(uninterrupted, tiny_model_path, tmp_path):
    """The control: from the same checkpoint without its buffer, the resumed run samples anew (as TRL does) and no
    longer matches, so the test above can fail."""
    name, output_dir, expected, _ = uninterrupted
    checkpoint = str(tmp_path / "checkpoint-1")
    shutil.copytree(
        os.path.join(output_dir, "checkpoint-1"), checkpoint, ignore=shutil.ignore_patterns("generation_buffer_*")
    )
    trainer = _trainer(name, tiny_model_path, str(tmp_path / "out"))
    trainer.train(resume_from_checkpoint=checkpoint)
    assert _max_diff(expected, _step_logs(trainer), range(2, 4)) > 1e-3

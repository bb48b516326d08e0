"""DistillationTrainer parity with TRL 1.16: the same tiny student and (wider) teacher, prompts and seed through both
give the same completions, per-step losses and metrics."""

from __future__ import annotations

import pytest

from llm_trainer.testing import make_tiny_model, zen_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("parity-teacher"), seed=1, hidden_size=48)


def _train(module, student, teacher, dataset, output_dir, **config):
    config = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "max_completion_length": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 11,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "log_completions": True,
        **config,
    }
    trainer = module.DistillationTrainer(
        model=student, teacher_model=teacher, args=module.DistillationConfig(**config), train_dataset=dataset
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"config_name": "conversational_prompt_only", "beta": 0.5, "temperature": 0.8},
        {"beta": 0.0, "gradient_accumulation_steps": 2, "top_k": 20},
        {"beta": 0.3, "disable_dropout": True, "max_completion_length": 16},
    ],
    ids=["reverse-kl", "conversational-jsd-temperature", "forward-kl-accumulation", "jsd-0.3"],
)
def test_distillation_parity(config, tiny_model_path, teacher_path, tmp_path):
    import llm_trainer

    config = dict(config)
    dataset = zen_dataset(config.pop("config_name", "standard_prompt_only"))
    ours = _train(llm_trainer, tiny_model_path, teacher_path, dataset, tmp_path / "ours", **config)
    theirs = _train(trl, tiny_model_path, teacher_path, dataset, tmp_path / "trl", **config)
    assert list(ours._logs["completion"]) == list(theirs._logs["completion"])
    # The loss is a divergence (→ 0 as the student nears the teacher) between per-token log-probabilities whose size
    # is ≈ the logged entropy: its float32 rounding is that of those terms (see helpers.rounding_scale)
    assert_same_training(ours, theirs, rtol=1e-4, loss_scale="entropy")

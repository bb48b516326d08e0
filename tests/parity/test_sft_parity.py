"""SFTTrainer parity with TRL 1.16: same tiny model, data and seed through both; per-step loss within 1e-4."""

from __future__ import annotations

import pytest

from llm_trainer.testing import zen_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")


def _train(module, model_path, dataset, tmp_path, peft_config=None, **config):
    config = {
        "output_dir": str(tmp_path / module.__name__),
        "report_to": "none",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 7,
        **config,
    }
    trainer = module.SFTTrainer(
        model=model_path, args=module.SFTConfig(**config), train_dataset=dataset, peft_config=peft_config
    )
    trainer.train()
    return trainer


CASES = {
    "standard_lm": ("standard_language_modeling", {}),
    "conversational_lm": ("conversational_language_modeling", {}),
    "prompt_completion": ("standard_prompt_completion", {}),
    "conversational_prompt_completion": ("conversational_prompt_completion", {}),
    "packing_bfd": ("standard_language_modeling", {"packing": True, "max_length": 32}),
    "packing_wrapped": (
        "standard_language_modeling",
        {"packing": True, "packing_strategy": "wrapped", "max_length": 16},
    ),
    "assistant_only_loss": ("conversational_language_modeling", {"assistant_only_loss": True}),
    "grad_accumulation_2": (
        "standard_language_modeling",
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    ),
    "truncation": ("standard_language_modeling", {"max_length": 6}),
    "dft_loss": ("standard_language_modeling", {"loss_type": "dft"}),
    "no_gradient_checkpointing": ("conversational_prompt_completion", {"gradient_checkpointing": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sft_matches_trl(case, tiny_model_path, tmp_path):
    import llm_trainer

    config_name, config = CASES[case]
    dataset = zen_dataset(config_name)
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, **config)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, **config)
    assert_same_training(ours, theirs)


def test_sft_lora_matches_trl(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    import llm_trainer

    dataset = zen_dataset("standard_language_modeling")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, peft.LoraConfig(**lora))
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, peft.LoraConfig(**lora))
    assert_same_training(ours, theirs)

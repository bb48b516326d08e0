"""ORPOTrainer / CPOTrainer parity with TRL 1.16's `trl.experimental` trainers: same tiny model, data and seed
through both; per-step loss within 1e-4 and the same metric names and values (`logits/*` included).

The TRL cases pin `packed_forward=False`: TRL's `logits/*` average the mean logit over every position of the padded
batch, padding included, which a packed forward never computes (it averages over the real positions). The `*_packed`
cases run the default (packed) forward and compare everything else."""

from __future__ import annotations

import os

import pytest

from llm_trainer.testing import zen_dataset

from .helpers import assert_same_training

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_orpo = pytest.importorskip("trl.experimental.orpo")
trl_cpo = pytest.importorskip("trl.experimental.cpo")


def _train(module, name, model_path, dataset, tmp_path, peft_config=None, **config):
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
    trainer_cls, config_cls = getattr(module, f"{name}Trainer"), getattr(module, f"{name}Config")
    trainer = trainer_cls(model=model_path, args=config_cls(**config), train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    return trainer


def _compare(name, model_path, dataset, tmp_path, peft_config=None, packed_forward=False, **config):
    from llm_trainer.experimental import cpo, orpo

    ours_module, trl_module = {"ORPO": (orpo, trl_orpo), "CPO": (cpo, trl_cpo)}[name]
    ours = _train(
        ours_module, name, model_path, dataset, tmp_path, peft_config, packed_forward=packed_forward, **config
    )
    theirs = _train(trl_module, name, model_path, dataset, tmp_path, peft_config, **config)
    if packed_forward is not False:  # packed `logits/*` leave out the padding positions TRL's count
        assert ours._packed
        for trainer in (ours, theirs):
            for log in trainer.state.log_history:
                log.pop("logits/chosen", None), log.pop("logits/rejected", None)
    assert_same_training(ours, theirs)


CASES = {
    "orpo": ("ORPO", "standard_preference", {}),
    "orpo_conversational": ("ORPO", "conversational_preference", {}),
    "orpo_implicit_prompt": ("ORPO", "standard_implicit_prompt_preference", {}),
    "orpo_truncated_completions": ("ORPO", "standard_preference", {"max_length": 16}),
    "cpo_sigmoid": ("CPO", "standard_preference", {"loss_type": "sigmoid"}),
    "cpo_sigmoid_label_smoothing": ("CPO", "conversational_preference", {"label_smoothing": 0.1}),
    "cpo_hinge": ("CPO", "standard_preference", {"loss_type": "hinge"}),
    "cpo_ipo": ("CPO", "conversational_preference", {"loss_type": "ipo"}),
    "cpo_simpo": ("CPO", "standard_implicit_prompt_preference", {"loss_type": "simpo", "simpo_gamma": 0.3}),
    "cpo_alphapo": ("CPO", "standard_preference", {"loss_type": "alphapo", "alpha": 0.1}),
    "cpo_grad_accumulation_2": (
        "CPO",
        "standard_preference",
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "max_length": 16},
    ),
    "orpo_packed": ("ORPO", "standard_preference", {"packed_forward": None}),
    "cpo_packed": ("CPO", "conversational_preference", {"packed_forward": None, "loss_type": "simpo"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_trl(case, tiny_model_path, tmp_path):
    name, config_name, config = CASES[case]
    _compare(name, tiny_model_path, zen_dataset(config_name), tmp_path, **config)


def test_orpo_lora_matches_trl(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _compare("ORPO", tiny_model_path, zen_dataset("standard_preference"), tmp_path, peft.LoraConfig(**lora))

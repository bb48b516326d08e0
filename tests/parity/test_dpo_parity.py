"""DPOTrainer parity with TRL 1.16: same tiny model, data and seed through both; per-step loss within 1e-4 and the
same metric names and values (within 1e-3)."""

from __future__ import annotations

import pytest

from llm_trainer.testing import zen_dataset

from .helpers import assert_same_training

trl = pytest.importorskip("trl")

DPO_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
}


def _train(module, model_path, dataset, tmp_path, peft_config=None, processing_class=None, **config):
    config = {
        "output_dir": str(tmp_path / module.__name__),
        "report_to": "none",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "bf16": False,
        "save_strategy": "no",
        "seed": 7,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        **config,
    }
    trainer = module.DPOTrainer(
        model=model_path,
        args=module.DPOConfig(**config),
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def _assert_parity(tiny_model_path, tmp_path, config_name="standard_preference", peft_config=None, **config):
    import llm_trainer

    dataset = zen_dataset(config_name)
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, peft_config, **config)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, peft_config, **config)
    assert_same_training(ours, theirs)
    logged = next(log for log in ours.state.log_history if "loss" in log)
    assert DPO_METRICS <= set(logged)
    return ours, theirs


# Every loss type TRL 1.16 accepts; the options each one needs to do something non-trivial.
LOSS_TYPES = {
    "sigmoid": {},
    "hinge": {},
    "ipo": {},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {},
    "sft": {},
    "sigmoid_norm": {},
}


def test_every_trl_loss_type_is_covered():
    from llm_trainer.losses import DPO_LOSS_TYPES

    assert set(LOSS_TYPES) == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_loss_type_matches_trl(loss_type, tiny_model_path, tmp_path):
    _assert_parity(tiny_model_path, tmp_path, loss_type=loss_type, **LOSS_TYPES[loss_type])


CASES = {
    "weighted_losses": {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5]},
    "wpo_weighting": {"use_weighting": True},
    "ld_alpha": {"ld_alpha": 0.5},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "js_divergence": {"f_divergence_type": "js_divergence"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "precompute_ref_log_probs": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 8},
    "grad_accumulation": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    "truncation_and_padding_free": {"max_length": 12, "padding_free": True},  # TRL pads; we pack
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_option_matches_trl(case, tiny_model_path, tmp_path):
    _assert_parity(tiny_model_path, tmp_path, **CASES[case])


@pytest.mark.parametrize(
    "config_name",
    ["conversational_preference", "standard_implicit_prompt_preference", "conversational_implicit_prompt_preference"],
)
def test_dataset_format_matches_trl(config_name, tiny_model_path, tmp_path):
    _assert_parity(tiny_model_path, tmp_path, config_name)


def test_lora_with_adapter_disabled_reference_matches_trl(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours, _ = _assert_parity(tiny_model_path, tmp_path, peft_config=lora)
    assert ours.ref_model is None  # the reference is the base model, run with the adapter disabled
    losses = [log["loss"] for log in ours.state.log_history if "loss" in log]
    assert losses[1] != losses[0]  # the adapter trained, so the policy moved away from the reference

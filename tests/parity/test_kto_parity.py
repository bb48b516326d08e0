"""KTOTrainer parity with TRL 1.16: same tiny model, data and seed through both; per-step loss within 1e-4 and the
same metric names."""

from __future__ import annotations

import pytest

from llm_trainer.testing import zen_dataset

from .helpers import VOLATILE, assert_close_metrics, assert_same_training

trl = pytest.importorskip("trl")


def _train(
    module, model_path, dataset, tmp_path, eval_dataset=None, peft_config=None, processing_class=None, **config
):
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
    trainer = module.KTOTrainer(
        model=model_path,
        args=module.KTOConfig(**config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


CASES = {
    "standard_unpaired": ("standard_unpaired_preference", {}),
    "conversational_unpaired": ("conversational_unpaired_preference", {}),
    "apo_zero_unpaired": ("standard_unpaired_preference", {"loss_type": "apo_zero_unpaired"}),
    "paired_auto_unpaired": ("standard_preference", {}),
    "conversational_paired_apo_zero": ("conversational_preference", {"loss_type": "apo_zero_unpaired"}),
    "implicit_prompt": ("standard_implicit_prompt_preference", {}),
    "weights_and_beta": (
        "standard_unpaired_preference",
        {"desirable_weight": 0.8, "undesirable_weight": 1.2, "beta": 0.5, "max_length": 8},
    ),
    "precompute_grad_accumulation": (
        "standard_unpaired_preference",
        {"precompute_ref_log_probs": True, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kto_matches_trl(case, tiny_model_path, tmp_path):
    import llm_trainer

    config_name, config = CASES[case]
    dataset = zen_dataset(config_name)
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, **config)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, **config)
    assert_same_training(ours, theirs)


def test_kto_eval_matches_trl(tiny_model_path, tmp_path):
    import llm_trainer

    dataset, eval_dataset = zen_dataset("standard_preference"), zen_dataset("standard_preference", "test")
    config = {"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4}
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, eval_dataset, **config)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, eval_dataset, **config)
    assert_same_training(ours, theirs)
    our_evals, their_evals = ([e for e in t.state.log_history if "eval_loss" in e] for t in (ours, theirs))
    assert len(our_evals) == len(their_evals) > 0
    for a, b in zip(our_evals, their_evals):
        keys = {k for k in a if not k.endswith(("_runtime", "_per_second"))} - VOLATILE
        assert keys == {k for k in b if not k.endswith(("_runtime", "_per_second"))} - VOLATILE
        assert {"eval_kl", "eval_rewards/margins", "eval_logits/chosen"} <= keys
        # eval_rewards/* and eval_kl are differences of log-probs: within float32 rounding of β·|logp| (see helpers)
        assert_close_metrics(a, b, sorted(keys - {"epoch", "step"}), rtol=1e-4, beta=ours.args.beta)


def test_kto_lora_matches_trl(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    import llm_trainer

    dataset = zen_dataset("standard_unpaired_preference")
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # At the default 1e-3 the adapter (B = 0 at init) barely moves the policy in 3 steps: rewards of ~6e-4 from log-probs
    # of ~110, i.e. a few hundred float32 eps of signal, and the KL term too small to show in the loss. 1e-2 makes the
    # rewards ~10× larger, and a dropped or sign-flipped KL term fails the loss check.
    config = {"learning_rate": 1e-2}
    ours = _train(llm_trainer, tiny_model_path, dataset, tmp_path, peft_config=peft.LoraConfig(**lora), **config)
    theirs = _train(trl, tiny_model_path, dataset, tmp_path, peft_config=peft.LoraConfig(**lora), **config)
    assert_same_training(ours, theirs)

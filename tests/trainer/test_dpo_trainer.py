"""DPOTrainer behaviour on the tiny offline model: training moves the policy and not the reference, TR-DPO syncing,
PEFT, precomputed reference log-probs, evaluation, and bad input failing with a message that names the fix."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from llm_trainer import DPOConfig, DPOTrainer
from llm_trainer.testing import zen_dataset

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


def _config(tmp_path, **kwargs) -> DPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    return DPOConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def preference():
    return zen_dataset("standard_preference")


# ------------------------------------------------------------------------------------------------------- training
def test_training_updates_the_policy_and_not_the_reference(tiny_model_path, tmp_path, preference):
    trainer = DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=preference)
    before, ref_before = _params(trainer.model), _params(trainer.ref_model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(ref_before[name], param), f"reference {name} changed"
        assert not param.requires_grad
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert DPO_METRICS <= set(logs[0])
    # policy == reference at step 1: −log σ(0) = log 2; the Trainer logs losses rounded to 4 decimals (hence 1e-4)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[1]["num_tokens"] > logs[0]["num_tokens"] > 0


def test_explicit_reference_model_is_used_and_frozen(tiny_model_path, tmp_path, preference):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():  # a different reference: the first step's rewards are no longer 0
        for param in ref_model.parameters():
            param.mul_(0.9)
    ref_before = _params(ref_model)
    trainer = DPOTrainer(model=tiny_model_path, ref_model=ref_model, args=_config(tmp_path), train_dataset=preference)
    trainer.train()
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["rewards/chosen"] != 0.0
    for name, param in ref_model.named_parameters():
        assert torch.equal(ref_before[name], param)


def test_sync_ref_model_mixes_the_policy_into_the_reference(tiny_model_path, tmp_path, preference):
    args = _config(tmp_path, max_steps=1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.25)
    trainer = DPOTrainer(model=tiny_model_path, args=args, train_dataset=preference)
    initial = _params(trainer.ref_model)
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, param in trainer.ref_model.named_parameters():
        expected = 0.25 * policy[name].detach() + 0.75 * initial[name]
        torch.testing.assert_close(param, expected)
        assert not torch.equal(param, initial[name])


def test_lora_trains_the_adapter_and_uses_the_base_model_as_reference(tiny_model_path, tmp_path, preference):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=tiny_model_path, args=_config(tmp_path, learning_rate=1.0), train_dataset=preference, peft_config=lora
    )
    assert trainer.ref_model is None
    before = _params(trainer.model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora" in name:
            assert not torch.equal(before[name], param), f"{name} did not change"
        else:
            torch.testing.assert_close(before[name], param)


def test_lora_on_the_lm_head_is_trained(tiny_model_path, tmp_path, preference):
    # TRL rejects it (its fused head reads `lm_head.weight` directly); here the log-probs fall back to the logits.
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(target_modules=["lm_head"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=tiny_model_path, args=_config(tmp_path, learning_rate=1.0), train_dataset=preference, peft_config=lora
    )
    before = _params(trainer.model)
    trainer.train()
    changed = [name for name, param in trainer.model.named_parameters() if not torch.equal(before[name], param)]
    assert changed and all("lm_head.lora" in name for name in changed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[1]["rewards/margins"] != 0.0 and logs[0]["logits/chosen"] != 0.0


def test_pretrained_peft_model_gets_a_frozen_ref_adapter(tiny_model_path, tmp_path, preference):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = peft.get_peft_model(
        base, peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    )
    trainer = DPOTrainer(model=model, args=_config(tmp_path, max_steps=1), train_dataset=preference)
    assert "ref" in trainer.model.peft_config
    ref_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref_before
    trainer.train()
    # The pretrained adapter is its own reference, so the first loss is log 2, not that of the bare base model.
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # logged losses are rounded to 4 decimals
    for name, param in trainer.model.named_parameters():
        if ".ref." in name:
            assert torch.equal(ref_before[name], param)


@pytest.mark.parametrize("peft_version, has_ref", [("0.19.1", False), ("0.20.0", True)])
def test_target_parameters_adapter_gets_a_ref_copy_only_where_peft_allows_two(
    tiny_model_path, tmp_path, preference, monkeypatch, caplog, peft_version, has_ref
):
    # PEFT 0.17-0.19 holds one adapter per model when LoRA uses `target_parameters` (MoE experts): there, as in
    # TRL, the reference is the base model (adapters disabled) instead of a "ref" copy.
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = peft.get_peft_model(base, peft.LoraConfig(target_parameters=["mlp.down_proj.weight"]))
    monkeypatch.setattr(peft, "__version__", peft_version)
    with caplog.at_level("WARNING", logger="llm_trainer.modeling"):
        trainer = DPOTrainer(model=model, args=_config(tmp_path, max_steps=1), train_dataset=preference)
    assert ("ref" in trainer.model.peft_config) is has_ref
    assert ("PEFT<0.20.0 can't add a frozen reference adapter" in caplog.text) is not has_ref
    trainer.train()
    # A fresh LoRA (B = 0) is the base model, so either reference gives the untrained loss log 2.
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # logged losses are rounded to 4 decimals


def test_precompute_ref_log_probs_adds_columns_and_drops_the_reference(tiny_model_path, tmp_path, preference):
    args = _config(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=16)
    trainer = DPOTrainer(model=tiny_model_path, args=args, train_dataset=preference, eval_dataset=preference)
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.eval_dataset.column_names)
    reference = DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=preference)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(3)])
    chosen, rejected = reference.compute_ref_log_probs(reference.ref_model, batch)
    tolerance = dict(rtol=1e-5, atol=1e-4)  # other batch shapes, other float rounding
    torch.testing.assert_close(chosen, torch.tensor(trainer.train_dataset["ref_chosen_logps"][:3]), **tolerance)
    torch.testing.assert_close(rejected, torch.tensor(trainer.train_dataset["ref_rejected_logps"][:3]), **tolerance)
    trainer.train()
    with pytest.raises(ValueError, match="after training started"):
        trainer.evaluate(zen_dataset("standard_preference", "test"))


def test_evaluation_logs_prefixed_metrics(tiny_model_path, tmp_path, preference):
    eval_dataset = zen_dataset("standard_preference", "test")
    args = _config(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2)
    trainer = DPOTrainer(model=tiny_model_path, args=args, train_dataset=preference, eval_dataset=eval_dataset)
    trainer.train()
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_logs and {f"eval_{name}" for name in DPO_METRICS} <= set(eval_logs[0])
    # A raw dataset given to `evaluate` is prepared like the ones given at construction; a dict is split by name
    # (the DPO metrics are logged with the plain `eval_` prefix, as TRL does).
    metrics = trainer.evaluate({"held_out": zen_dataset("conversational_preference", "test")})
    assert "eval_held_out_loss" in metrics
    assert "eval_rewards/margins" in trainer.state.log_history[-1]


def test_compute_metrics_receives_logits(tiny_model_path, tmp_path, preference):
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"seen": 1.0}

    eval_dataset = zen_dataset("standard_preference", "test")
    trainer = DPOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, per_device_eval_batch_size=2),
        train_dataset=preference,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
    )
    with pytest.warns(FutureWarning, match="extra forward pass"):
        metrics = trainer.evaluate()
    assert metrics["eval_seen"] == 1.0
    assert seen["shape"][0] == 2 * len(eval_dataset) and seen["shape"][-1] == trainer.model.config.vocab_size


def test_disable_dropout_covers_policy_and_reference(tiny_model_path, tmp_path, preference):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.model.extra_dropout = torch.nn.Dropout(0.5)
    trainer = DPOTrainer(model=model, args=_config(tmp_path), train_dataset=preference)
    assert trainer.model.model.extra_dropout.p == 0.0
    assert trainer.ref_model.model.extra_dropout.p == 0.0
    kept = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
        args=_config(tmp_path, disable_dropout=False),
        train_dataset=preference,
    )
    assert kept.args.disable_dropout is False


def test_padding_free_runs_packed(tiny_model_path, tmp_path, preference):
    """`padding_free=True` means `packed_forward=True` (TRL 1.16 disables it; packed batches give the same loss)."""
    trainer = DPOTrainer(model=tiny_model_path, args=_config(tmp_path, padding_free=True), train_dataset=preference)
    assert trainer.padding_free is True
    trainer.train()
    assert trainer.state.global_step == 2
    padded = DPOTrainer(model=tiny_model_path, args=_config(tmp_path, packed_forward=False), train_dataset=preference)
    assert padded.padding_free is False


def test_streaming_dataset_trains(tiny_model_path, tmp_path, preference):
    trainer = DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=preference.to_iterable_dataset())
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="not supported with IterableDataset.*needs a map-style `Dataset`"):
        DPOTrainer(
            model=tiny_model_path,
            args=_config(tmp_path, precompute_ref_log_probs=True),
            train_dataset=preference.to_iterable_dataset(),
        )


def test_implicit_prompt_is_extracted(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_implicit_prompt_preference")
    trainer = DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    row = trainer.train_dataset[0]
    assert row["prompt"] == "Beautiful is better than"
    eos = trainer.processing_class.eos_token_id
    assert row["chosen_ids"][-1] == eos and row["rejected_ids"][-1] == eos


# ---------------------------------------------------------------------------------------------------- configuration
def test_config_has_trls_fields_and_defaults(tmp_path):
    trl = pytest.importorskip("trl")

    def defaults(cls):
        values = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        return values

    ours = defaults(DPOConfig)
    assert ours.pop("packed_forward") is None  # llm_trainer's own field (packed batches where the model supports them)
    assert ours.pop("freeze_vision_tower") is False  # llm_trainer's own field (VLMs: train the language model only)
    assert ours == defaults(trl.DPOConfig)
    assert all(f.metadata.get("help") for f in dataclasses.fields(DPOConfig))
    config = DPOConfig(str(tmp_path), loss_type="ipo")
    assert config.loss_type == ["ipo"] and config.learning_rate == 1e-6 and config.beta == 0.1


def test_default_config_is_named_after_the_model(tiny_model_path, tmp_path, monkeypatch, preference):
    monkeypatch.chdir(tmp_path)
    trainer = DPOTrainer(model=tiny_model_path, train_dataset=preference)
    assert trainer.args.output_dir.endswith(f"{os.path.basename(tiny_model_path)}-DPO")
    assert isinstance(trainer.args, DPOConfig) and trainer.args.loss_type == ["sigmoid"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "dpo"}, "Unknown DPO loss_type.*Valid loss types: sigmoid"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "one weight per loss type"),
        ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "f_divergence_type='reverse_kl'"),
        ({"f_divergence_type": "kl"}, "Unknown f_divergence_type"),
        ({"loss_type": "exo_pair"}, "needs `label_smoothing` > 0"),
        ({"ld_alpha": 1.5}, r"`ld_alpha` must lie in \[0.0, 1.0\]"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "Set one of them to False"),
        ({"max_length": 0}, "positive number of tokens"),
        ({"truncation_mode": "middle"}, "`truncation_mode` must be one of"),
    ],
)
def test_bad_config_raises_a_helpful_error(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DPOConfig(str(tmp_path), **kwargs)


def test_wpo_weighting_with_a_sorting_loss_is_rejected(tmp_path):
    with pytest.raises(NotImplementedError, match="'aot'"):
        DPOConfig(str(tmp_path), loss_type="aot", use_weighting=True)


def test_dataset_without_chosen_and_rejected_is_rejected(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a"], "good": ["b"], "bad": ["c"]})
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected'.*missing: \['chosen', 'rejected'\]"):
        DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)


def test_missing_train_dataset_is_rejected(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        DPOTrainer(model=tiny_model_path, args=_config(tmp_path))


def test_same_object_as_model_and_reference_is_rejected(tiny_model_path, tmp_path, preference):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="same object. Omit `ref_model`"):
        DPOTrainer(model=model, ref_model=model, args=_config(tmp_path), train_dataset=preference)


def test_sync_ref_model_with_peft_is_rejected(tiny_model_path, tmp_path, preference):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="Set `sync_ref_model=False`"):
        DPOTrainer(
            model=tiny_model_path,
            args=_config(tmp_path, sync_ref_model=True),
            train_dataset=preference,
            peft_config=peft.LoraConfig(task_type="CAUSAL_LM"),
        )


def test_vision_dataset_with_a_text_only_model_is_rejected(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"], "images": [[]]})
    with pytest.raises(ValueError, match="is not a vision-language model") as error:
        DPOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    assert "remove_columns('images')" in str(error.value)  # the fix

"""KTOTrainer behaviour on the tiny offline model: training moves the policy and not the reference, evaluation
metrics are prefixed, precomputed reference log-probs and PEFT references work, bad input fails clearly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset
from parity.helpers import FLOAT32_EPS, ROUNDING_SAFETY, rounding_scale
from transformers import AutoModelForCausalLM

from llm_trainer import KTOConfig, KTOTrainer
from llm_trainer.testing import zen_dataset

METRICS = {
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "num_tokens",
}


def _config(tmp_path, **kwargs) -> KTOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
    )
    return KTOConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _steps(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_training_moves_the_policy_not_the_reference(loss_type, tiny_model_path, tmp_path):
    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, loss_type=loss_type),
        train_dataset=zen_dataset("standard_unpaired_preference"),
    )
    policy, reference = _params(trainer.model), _params(trainer.ref_model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(policy[name], param), f"{name} did not change"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(reference[name], param) and not param.requires_grad, f"reference {name} changed"
    logs = _steps(trainer)
    assert METRICS <= set(logs[0])
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["kl"] == 0.0  # the policy starts as the reference
    assert logs[-1]["rewards/margins"] != 0.0


def test_eval_metrics_have_eval_prefix(tiny_model_path, tmp_path):
    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=1, per_device_eval_batch_size=4),
        train_dataset=zen_dataset("standard_unpaired_preference"),
        eval_dataset=zen_dataset("standard_preference", "test"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {f"eval_{name}" for name in METRICS - {"num_tokens"}} | {"eval_loss"} <= set(metrics)
    assert not any(key in metrics for key in METRICS)
    # A raw dataset handed to `evaluate` is prepared like the constructor's
    raw = trainer.evaluate(zen_dataset("conversational_preference", "test"))
    assert math.isfinite(raw["eval_loss"])


def test_compute_metrics_gets_the_logits(tiny_model_path, tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"rows": float(prediction.predictions.shape[0])}

    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=1),
        train_dataset=zen_dataset("standard_unpaired_preference"),
        eval_dataset=zen_dataset("standard_unpaired_preference", "test"),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 2.0 and seen["shape"][-1] == trainer.model.config.vocab_size


def test_iterable_dataset(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_unpaired_preference").to_iterable_dataset()
    trainer = KTOTrainer(model=tiny_model_path, args=_config(tmp_path, max_steps=2), train_dataset=dataset)
    trainer.train()
    assert len(_steps(trainer)) == 2 and math.isfinite(_steps(trainer)[-1]["loss"])


def test_precomputed_reference_log_probs_train_the_same(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_unpaired_preference")
    live = KTOTrainer(model=tiny_model_path, args=_config(tmp_path / "live"), train_dataset=dataset)
    live.train()
    pre = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path / "pre", precompute_ref_log_probs=True, precompute_ref_batch_size=8),
        train_dataset=dataset,
    )
    assert pre.ref_model is None
    assert {"ref_logps", "ref_KL_logps"} <= set(pre.train_dataset.column_names)
    pre.train()
    for a, b in zip(_steps(live), _steps(pre), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        # The KL is a difference of sequence log-probs, here from reference forwards in batches of 8 vs 4: beyond 1e-4
        # relative, it may differ by float32 rounding of |logp| (tests/parity/helpers.py)
        kl_tol = ROUNDING_SAFETY * FLOAT32_EPS * rounding_scale("kl", (a, b))
        assert math.isclose(a["kl"], b["kl"], rel_tol=1e-4, abs_tol=kl_tol), (a["kl"], b["kl"], kl_tol)


def test_precompute_refuses_raw_eval_after_training(tiny_model_path, tmp_path):
    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=1, precompute_ref_log_probs=True),
        train_dataset=zen_dataset("standard_unpaired_preference"),
    )
    trainer.train()
    with pytest.raises(ValueError, match="Pass the dataset as `eval_dataset` when creating the trainer"):
        trainer.evaluate(zen_dataset("standard_preference", "test"))


def test_given_ref_model_is_used_and_frozen(tiny_model_path, tmp_path):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for param in ref_model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    trainer = KTOTrainer(
        model=tiny_model_path,
        ref_model=ref_model,
        args=_config(tmp_path, max_steps=1),
        train_dataset=zen_dataset("standard_unpaired_preference"),
    )
    assert trainer.ref_model is ref_model and not any(p.requires_grad for p in ref_model.parameters())
    trainer.train()
    assert _steps(trainer)[0]["rewards/chosen"] != 0.0  # the reference differs from the initial policy


def test_lora_reference_is_the_adapter_free_model(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, learning_rate=0.1),
        train_dataset=zen_dataset("standard_unpaired_preference"),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    before = _params(trainer.model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == ("lora_" in name), name
    assert _steps(trainer)[0]["rewards/chosen"] == 0.0  # LoRA starts as a no-op: policy == reference


def test_peft_model_gets_a_frozen_ref_adapter(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    trainer = KTOTrainer(
        model=model, args=_config(tmp_path, max_steps=1), train_dataset=zen_dataset("standard_unpaired_preference")
    )
    assert "ref" in model.peft_config and model.active_adapter == "default"
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    trainer.train()
    # The reference is the adapter as it was, not the bare base model: the first step's rewards are zero
    assert _steps(trainer)[0]["rewards/chosen"] == 0.0
    assert all(torch.equal(ref[n], p) for n, p in model.named_parameters() if ".ref." in n)


def test_sync_ref_model_mixes_the_policy_in(tiny_model_path, tmp_path):
    trainer = KTOTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, max_steps=2, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5),
        train_dataset=zen_dataset("standard_unpaired_preference"),
    )
    initial = _params(trainer.ref_model)
    trainer.train()
    name, param = next(iter(trainer.model.named_parameters()))
    expected = 0.5 * initial[name] + 0.5 * param.detach()
    torch.testing.assert_close(dict(trainer.ref_model.named_parameters())[name], expected)


def test_experimental_alias_warns(tiny_model_path, tmp_path):
    from llm_trainer.experimental.kto import KTOConfig as OldConfig
    from llm_trainer.experimental.kto import KTOTrainer as OldTrainer

    with pytest.warns(FutureWarning, match="deprecated"):
        args = OldConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, bf16=False)
    with pytest.warns(FutureWarning, match="deprecated"):
        trainer = OldTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_preference"))
    assert isinstance(trainer, KTOTrainer)


# ------------------------------------------------------------------------------------------------ bad input
def test_labels_of_one_kind(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_unpaired_preference")
    desirable = dataset.filter(lambda row: row["label"])
    with pytest.raises(ValueError, match="Every example of the train dataset is desirable.*SFTTrainer"):
        KTOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=desirable)


def test_labels_are_checked_as_given_and_truncation_only_warns(tiny_model_path, tmp_path, caplog):
    # Both kinds as given; truncation then drops the only undesirable example (its prompt fills max_length).
    dataset = Dataset.from_dict(
        {
            "prompt": ["Hi", "Hi", "a very long prompt that fills the whole max_length budget on its own"],
            "completion": [" there", " you", " yes"],
            "label": [True, True, False],
        }
    )
    with caplog.at_level("WARNING", logger="llm_trainer.data.unpaired"):
        trainer = KTOTrainer(model=tiny_model_path, args=_config(tmp_path, max_length=6), train_dataset=dataset)
    assert trainer.train_dataset["label"] == [True, True]
    assert "All 1 undesirable (label=False) examples of the train dataset were dropped" in caplog.text
    # One kind as given is still the user's labelling error, whatever truncation would keep.
    with pytest.raises(ValueError, match="Every example of the train dataset is desirable"):
        KTOTrainer(model=tiny_model_path, args=_config(tmp_path, max_length=6), train_dataset=dataset.select([0, 1]))


def test_missing_columns(tiny_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "response": ["c", "d"], "label": [True, False]})
    with pytest.raises(ValueError, match=r"missing: \['completion'\]. Rename your columns"):
        KTOTrainer(model=tiny_model_path, args=_config(tmp_path), train_dataset=dataset)


def test_missing_train_dataset(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        KTOTrainer(model=tiny_model_path, args=_config(tmp_path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "sigmoid"}, r"`loss_type` must be one of \('kto', 'apo_zero_unpaired'\), got 'sigmoid'"),
        ({"train_sampling_strategy": "random"}, "needs `train_sampling_strategy='sequential'`"),
        ({"per_device_train_batch_size": 1}, "`per_device_train_batch_size` must be at least 2"),
        ({"beta": 0.0}, "`beta` must be positive"),
        ({"desirable_weight": -1.0}, "must be non-negative"),
        ({"max_length": 0}, "`max_length` must be a positive number of tokens or None"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "Set one of them to False"),
    ],
)
def test_bad_config(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kwargs)


def test_apo_zero_allows_random_order_and_batch_size_one(tmp_path):
    config = _config(
        tmp_path, loss_type="apo_zero_unpaired", train_sampling_strategy="random", per_device_train_batch_size=1
    )
    assert config.train_sampling_strategy == "random"


def test_same_model_as_reference(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="omit `ref_model`"):
        KTOTrainer(
            model=model, ref_model=model, args=_config(tmp_path), train_dataset=zen_dataset("standard_preference")
        )


def test_sync_ref_model_with_peft(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="Set `sync_ref_model=False`"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KTOTrainer(
            model=tiny_model_path,
            args=_config(tmp_path, sync_ref_model=True),
            train_dataset=zen_dataset("standard_preference"),
            peft_config=peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )

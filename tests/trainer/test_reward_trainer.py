"""RewardTrainer behaviour on a tiny offline reward model: training changes the weights, metrics are named as in
TRL, the model is set up for sequence classification, bad input fails with a message naming the fix."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification

from llm_trainer import RewardConfig, RewardTrainer
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset

REWARD_METRICS = {"accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"}


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-reward"), task="sequence-classification")


def _config(tmp_path, **kwargs) -> RewardConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
    )
    return RewardConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("config_name", ["standard_implicit_prompt_preference", "conversational_preference"])
def test_training_updates_every_parameter(config_name, reward_model_path, tmp_path):
    trainer = RewardTrainer(model=reward_model_path, args=_config(tmp_path), train_dataset=zen_dataset(config_name))
    before = _params(trainer.model)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert REWARD_METRICS <= set(logs[0])
    assert (
        0.0 <= logs[0]["accuracy"] <= 1.0 and logs[0]["min_reward"] <= logs[0]["mean_reward"] <= logs[0]["max_reward"]
    )
    assert logs[1]["num_tokens"] > logs[0]["num_tokens"] > 0  # cumulative


def test_eval_metrics_are_prefixed(reward_model_path, tmp_path):
    args = _config(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = RewardTrainer(
        model=reward_model_path,
        args=args,
        train_dataset=zen_dataset("standard_preference"),
        eval_dataset=zen_dataset("standard_preference", "test"),
    )
    trainer.train()
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_logs and {f"eval_{name}" for name in REWARD_METRICS - {"num_tokens"}} <= set(eval_logs[0])
    # a raw dataset passed to `evaluate` is prepared like the constructor's
    metrics = trainer.evaluate(zen_dataset("conversational_preference", "test"))
    assert "eval_accuracy" in metrics and "accuracy" not in metrics


def test_causal_lm_checkpoint_loads_as_a_one_label_classifier(tiny_model_path, tmp_path, caplog):
    from transformers.modeling_layers import GenericForSequenceClassification

    class_state = dict(GenericForSequenceClassification.__dict__)  # TRL's own trainer may have changed it already
    tokenizer = get_tokenizer()
    tokenizer.pad_token = None  # falls back to eos, which the model must learn as its pad id
    trainer = RewardTrainer(
        model=tiny_model_path,
        args=_config(tmp_path),
        train_dataset=zen_dataset("standard_preference"),
        processing_class=tokenizer,
    )
    assert type(trainer.model).__name__ == "Qwen2ForSequenceClassification"
    assert trainer.model.config.num_labels == 1 and trainer.model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token
    assert trainer.model.config.pad_token_id == tokenizer.eos_token_id
    # the expected new `score` / unused `lm_head` keys are not reported, and the class is left as it was
    assert "score.weight" not in caplog.text
    assert dict(GenericForSequenceClassification.__dict__) == class_state


def test_reward_is_read_at_the_last_real_token(reward_model_path, tmp_path):
    """Padding after a sequence must not change its score (needs `config.pad_token_id`)."""
    trainer = RewardTrainer(
        model=reward_model_path, args=_config(tmp_path), train_dataset=zen_dataset("standard_preference")
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model = trainer.model.eval()
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        first = torch.tensor([trainer.train_dataset[0]["chosen_ids"]])
        alone = model(input_ids=first, attention_mask=torch.ones_like(first)).logits[0, 0]
    torch.testing.assert_close(padded[0], alone)


def test_margin_and_centering_enter_the_loss(reward_model_path, tmp_path):
    dataset = zen_dataset("standard_implicit_prompt_preference").select(range(4))
    dataset = dataset.add_column("margin", [2.0] * 4)
    trainer = RewardTrainer(model=reward_model_path, args=_config(tmp_path), train_dataset=dataset)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    assert batch["margin"].tolist() == [2.0] * 4
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = rewards.chunk(2)
        loss = trainer.compute_loss(trainer.model, batch)
        trainer.args.center_rewards_coefficient = 0.5
        centered = trainer.compute_loss(trainer.model, batch)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - 2.0).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(centered, expected + 0.5 * ((chosen + rejected) ** 2).mean())


def test_over_long_pairs_are_dropped(reward_model_path, tmp_path):
    dataset = zen_dataset("standard_implicit_prompt_preference")
    trainer = RewardTrainer(model=reward_model_path, args=_config(tmp_path, max_length=12), train_dataset=dataset)
    assert 0 < len(trainer.train_dataset) < len(dataset)
    assert all(len(row["chosen_ids"]) <= 12 and len(row["rejected_ids"]) <= 12 for row in trainer.train_dataset)


def test_lora_trains_adapter_and_score_head_only(reward_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    trainer = RewardTrainer(
        model=reward_model_path,
        args=_config(tmp_path, learning_rate=1.0),
        train_dataset=zen_dataset("standard_preference"),
        peft_config=lora,
    )
    before = _params(trainer.model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            assert not torch.equal(before[name], param), f"{name} did not change"
        elif "lora_A" not in name:
            torch.testing.assert_close(before[name], param, msg=f"{name} changed")


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_dropout_is_disabled_by_default(disable_dropout, reward_model_path, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    model.score = torch.nn.Sequential(torch.nn.Dropout(0.5), model.score)
    args = _config(tmp_path, disable_dropout=disable_dropout)
    trainer = RewardTrainer(model=model, args=args, train_dataset=zen_dataset("standard_preference"))
    assert trainer.model.score[0].p == (0.0 if disable_dropout else 0.5)


def test_config_defaults_match_trl(tmp_path):
    args = RewardConfig(str(tmp_path))
    assert (args.learning_rate, args.max_length, args.disable_dropout) == (1e-4, 1024, True)
    assert args.center_rewards_coefficient is None and args.pad_to_multiple_of is None
    assert args.gradient_checkpointing and args.logging_steps == 10
    with pytest.warns(FutureWarning, match="pad_token"):
        RewardConfig(str(tmp_path), pad_token="<|endoftext|>")


def test_bad_config_values_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"`center_rewards_coefficient` must be >= 0 \(0.01"):
        RewardConfig(str(tmp_path), center_rewards_coefficient=-0.01)
    with pytest.raises(ValueError, match="`max_length` must be a positive number of tokens or None"):
        RewardConfig(str(tmp_path), max_length=0)


def test_dataset_missing_rejected_is_rejected(reward_model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["The sky is"], "chosen": [" blue."]})
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected'.*missing: \['rejected'\]"):
        RewardTrainer(model=reward_model_path, args=_config(tmp_path), train_dataset=dataset)


def test_missing_or_wrong_datasets_are_rejected(reward_model_path, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        RewardTrainer(model=reward_model_path, args=_config(tmp_path))
    with pytest.raises(TypeError, match="must be a `datasets.Dataset`"):
        RewardTrainer(model=reward_model_path, args=_config(tmp_path), train_dataset=[{"chosen": "a"}])


def test_multi_label_model_is_rejected(reward_model_path, tmp_path):
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(reward_model_path, num_labels=2))
    with pytest.raises(ValueError, match=r"`num_labels=2`.*load it with `num_labels=1`"):
        RewardTrainer(model=model, args=_config(tmp_path), train_dataset=zen_dataset("standard_preference"))


def test_unknown_special_tokens_are_rejected(reward_model_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    with pytest.raises(ValueError, match="`eos_token` '<eos>' is not in the tokenizer's vocabulary"):
        RewardTrainer(model=reward_model_path, args=_config(tmp_path, eos_token="<eos>"), train_dataset=dataset)


def test_chat_template_path_replaces_the_template(reward_model_path, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    args = _config(tmp_path, chat_template_path=str(template))
    trainer = RewardTrainer(
        model=reward_model_path, args=args, train_dataset=zen_dataset("conversational_implicit_prompt_preference")
    )
    text = trainer.processing_class.decode(trainer.train_dataset[0]["chosen_ids"])
    assert text.startswith("[user] Complete the aphorism:") and "<|im_start|>" not in text

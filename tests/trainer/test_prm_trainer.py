"""PRMTrainer (TRL 1.13's API; no TRL in the venv to compare with): stepwise tokenization against hand-built ids,
training of a token-classification model, the default accuracy metric, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForTokenClassification, EvalPrediction

from llm_trainer import PRMConfig, PRMTrainer
from llm_trainer.testing import get_tokenizer, make_tiny_model
from llm_trainer.trainer.prm_trainer import compute_accuracy

ROW = {"prompt": "Beautiful is better than", "completions": [", let me think...", " ugly."], "labels": [False, True]}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-prm"), task="token-classification")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _config(tmp_path, **kwargs) -> PRMConfig:
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
    return PRMConfig(**{**defaults, **kwargs})


def _dataset() -> Dataset:
    rows = [
        ROW,
        {"prompt": "Explicit is better than", "completions": [" implicit.", " twice."], "labels": [True, False]},
        {
            "prompt": "Simple is better than",
            "completions": [" complex.", " so", " there."],
            "labels": [True, True, True],
        },
        {"prompt": "Flat is better than", "completions": [" round."], "labels": [False]},
    ]
    return Dataset.from_list(rows * 2)


def test_tokenize_row_by_hand(tokenizer):
    out = PRMTrainer.tokenize_row(ROW, tokenizer, "\n", None, None, False, False)
    prompt, step1, step2, sep = (_ids(tokenizer, t) for t in (ROW["prompt"], ROW["completions"][0], " ugly.", "\n"))
    assert tokenizer.bos_token_id is None  # no bos: the prompt starts the sequence
    assert out["input_ids"] == prompt + step1 + sep + step2 + sep
    first_end = len(prompt) + len(step1) + len(sep) - 1
    expected = [-100] * len(out["input_ids"])
    expected[first_end], expected[-1] = 0, 1
    assert out["labels"] == expected


def test_last_step_only_and_eval(tokenizer):
    train = PRMTrainer.tokenize_row(ROW, tokenizer, "\n", None, None, True, False)
    assert [label for label in train["labels"] if label != -100] == [1]
    evaluation = PRMTrainer.tokenize_row(ROW, tokenizer, "\n", None, None, True, True)
    assert [label for label in evaluation["labels"] if label != -100] == [0, 1]  # eval keeps every step


def test_truncation_and_multi_token_separator(tokenizer):
    separator = " Next step: "
    sep = _ids(tokenizer, separator)
    assert len(sep) > 1
    full = PRMTrainer.tokenize_row(ROW, tokenizer, separator, None, None, False, False)
    step1 = _ids(tokenizer, ROW["completions"][0])
    prompt_len = len(_ids(tokenizer, ROW["prompt"]))
    assert full["labels"][prompt_len + len(step1) + len(sep) - 1] == 0  # on the separator's last token
    cut = PRMTrainer.tokenize_row(ROW, tokenizer, separator, None, len(step1) + 1, False, False)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + len(step1) + 1]
    short = PRMTrainer.tokenize_row(ROW, tokenizer, separator, 4, None, False, False)
    assert short == {"input_ids": full["input_ids"][:4], "labels": full["labels"][:4]}


def test_training_lowers_the_loss_and_updates_the_weights(prm_path, tmp_path):
    dataset = _dataset()
    trainer = PRMTrainer(
        model=prm_path, args=_config(tmp_path, max_steps=10), train_dataset=dataset, eval_dataset=dataset
    )
    assert isinstance(trainer.model, AutoModelForTokenClassification._model_mapping[type(trainer.model.config)])
    assert trainer.train_dataset.column_names == ["input_ids", "labels"]
    before_metrics = trainer.evaluate()
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after_metrics = trainer.evaluate()
    assert after_metrics["eval_loss"] < before_metrics["eval_loss"] - 0.05, (before_metrics, after_metrics)
    assert 0.0 <= after_metrics["eval_accuracy"] <= 1.0
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"


def test_evaluate_prepares_a_raw_dataset(prm_path, tmp_path):
    """`evaluate(raw_dataset)` tokenizes it as the constructor does (it failed when PRM tokenized inline)."""
    dataset = _dataset()
    trainer = PRMTrainer(model=prm_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    assert trainer.evaluate(dataset)["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])
    assert "eval_raw_accuracy" in trainer.evaluate({"raw": dataset})


def test_model_instance_with_tokenizer(prm_path, tmp_path, tokenizer):
    model = AutoModelForTokenClassification.from_pretrained(prm_path)
    trainer = PRMTrainer(
        model=model, args=_config(tmp_path, max_steps=1), train_dataset=_dataset(), processing_class=tokenizer
    )
    trainer.train()
    assert trainer.model is model


def test_compute_accuracy_by_hand():
    logits = np.zeros((1, 4, 2))
    logits[0, 1, 1] = logits[0, 2, 0] = logits[0, 3, 1] = 1.0  # argmax: [0, 1, 0, 1]
    labels = np.array([[-100, 1, 1, 1]])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 2 / 3}


def test_experimental_path():
    from llm_trainer.experimental.prm import PRMConfig as Config
    from llm_trainer.experimental.prm import PRMTrainer as Trainer

    assert Config is PRMConfig and Trainer is PRMTrainer
    config = PRMConfig("out")
    assert (config.learning_rate, config.step_separator, config.train_on_last_step_only) == (1e-5, "\n", False)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_columns(prm_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a"], "steps": [["b"]], "labels": [[True]]})
    with pytest.raises(ValueError, match=r"missing: \['completions'\]"):
        PRMTrainer(model=prm_path, args=_config(tmp_path), train_dataset=dataset)


def test_one_label_per_step(tokenizer):
    with pytest.raises(ValueError, match="one label per step"):
        PRMTrainer.tokenize_row({**ROW, "labels": [True]}, tokenizer, "\n", None, None, False, False)


def test_conversational_prompts_are_rejected(prm_path, tmp_path):
    dataset = Dataset.from_list([{**ROW, "prompt": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ValueError, match="apply_chat_template"):
        PRMTrainer(model=prm_path, args=_config(tmp_path), train_dataset=dataset)


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="`step_separator` must be non-empty"):
        _config(tmp_path, step_separator="")
    with pytest.raises(ValueError, match="`max_completion_length` must be a positive"):
        _config(tmp_path, max_completion_length=0)


def test_model_init_is_not_supported(tmp_path):
    with pytest.raises(ValueError, match="`model_init` is not supported"):
        PRMTrainer(model_init=lambda: None, args=_config(tmp_path), train_dataset=_dataset())

"""Unpaired preference data: preparation (unpairing, eos, tokenization, KL completions), label checks, collator."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

from llm_trainer.data.unpaired import (
    DataCollatorForUnpairedPreference,
    check_label_balance,
    check_unpaired_dataset,
    prepare_unpaired_dataset,
    recommend_loss_weights,
)
from llm_trainer.testing import get_tokenizer, zen_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def test_collator_matches_trl_docstring():
    collator = DataCollatorForUnpairedPreference(pad_token_id=0)
    examples = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "KL_completion_ids": [6], "label": True},
        {"prompt_ids": [7, 8], "completion_ids": [9], "KL_completion_ids": [10, 11], "label": False},
    ]
    out = collator(examples)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert out["KL_input_ids"].tolist() == [[1, 2, 3, 6], [7, 8, 10, 11]]
    assert out["KL_completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert out["label"].dtype == torch.bool and out["label"].tolist() == [True, False]


def test_collator_truncates_passes_ref_logps_and_pads_to_multiple():
    collator = DataCollatorForUnpairedPreference(pad_token_id=9, max_length=4, pad_to_multiple_of=8)
    out = collator([{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True, "ref_logps": -1.5}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 9, 9, 9, 9]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 0, 0, 0, 0]]
    assert out["ref_logps"].tolist() == [-1.5]
    assert "KL_input_ids" not in out


def test_standard_rows_get_eos_and_split_at_the_prompt(tokenizer):
    dataset = prepare_unpaired_dataset(zen_dataset("standard_unpaired_preference"), tokenizer)
    row = dataset[0]
    assert row["prompt_ids"] == tokenizer("Beautiful is better than")["input_ids"]
    assert row["completion_ids"] == tokenizer(" ugly.<|im_end|>")["input_ids"]
    assert row["label"] is True and "KL_completion_ids" not in row


def test_conversational_rows_use_the_chat_template(tokenizer):
    row = prepare_unpaired_dataset(zen_dataset("conversational_unpaired_preference"), tokenizer)[0]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
    assert row["prompt_ids"] + row["completion_ids"] == full["input_ids"]
    assert tokenizer.decode(row["completion_ids"]).startswith("Beautiful")


def test_paired_data_is_unpaired_chosen_first(tokenizer):
    dataset = prepare_unpaired_dataset(zen_dataset("standard_preference").select(range(3)), tokenizer)
    assert dataset["label"] == [True, True, True, False, False, False]
    assert dataset["prompt"][:3] == dataset["prompt"][3:]


def test_kl_completions_rotate_within_each_batch(tokenizer):
    dataset = prepare_unpaired_dataset(zen_dataset("standard_unpaired_preference"), tokenizer, kl_batch_size=4)
    completions, kl = dataset["completion_ids"], dataset["KL_completion_ids"]
    for start in range(0, len(dataset), 4):
        batch = completions[start : start + 4]
        assert kl[start : start + 4] == batch[-1:] + batch[:-1]


def test_rows_whose_prompt_fills_max_length_are_dropped(tokenizer):
    dataset = zen_dataset("standard_unpaired_preference")
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in dataset["prompt"]]
    prepared = prepare_unpaired_dataset(dataset, tokenizer, max_length=5)
    assert len(prepared) == sum(length < 5 for length in prompt_lengths) < len(dataset)


def test_pretokenized_rows_skip_tokenization(tokenizer):
    dataset = Dataset.from_dict({"prompt_ids": [[1, 2], [3]], "completion_ids": [[4], [5, 6]], "label": [True, False]})
    prepared = prepare_unpaired_dataset(dataset, tokenizer, kl_batch_size=2)
    assert prepared["completion_ids"] == [[4], [5, 6]]
    assert prepared["KL_completion_ids"] == [[5, 6], [4]]


@pytest.mark.parametrize(
    "columns, missing",
    [({"prompt": ["a"], "completion": ["b"]}, "'label'"), ({"text": ["a"]}, "'prompt', 'completion', 'label'")],
)
def test_missing_columns_are_named(columns, missing):
    with pytest.raises(ValueError, match=f"missing: \\[{missing}\\]"):
        check_unpaired_dataset(Dataset.from_dict(columns))


def test_empty_dataset():
    with pytest.raises(ValueError, match="is empty"):
        check_unpaired_dataset(Dataset.from_dict({"prompt": [], "completion": [], "label": []}))


@pytest.mark.parametrize("labels, kind", [([True, True], "desirable"), ([False], "undesirable")])
def test_labels_of_one_kind_are_rejected(labels, kind):
    with pytest.raises(ValueError, match=f"Every example of the train dataset is {kind}.*needs both"):
        check_label_balance(labels)
    check_label_balance([True, False])


def test_weight_recommendation(caplog):
    labels = [True] * 3 + [False] * 9  # 3x more undesirable: desirable_weight in [3, 3.99] is the advice
    with caplog.at_level(logging.WARNING, logger="llm_trainer.data.unpaired"):
        recommend_loss_weights(labels, 1.0, 1.0)
    assert "desirable_weight in [3.0, 3.99]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llm_trainer.data.unpaired"):
        recommend_loss_weights(labels, 3.5, 1.0)
        recommend_loss_weights([True, False], 1.0, 1.0)
    assert caplog.text == ""

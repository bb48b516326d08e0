"""Preference-pair preparation for the reward model (`data.reward_dataset`) and for ORPO / CPO
(`data.reference_free_dataset`), checked against TRL 1.16's own preprocessing."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset

from llm_trainer.data.reference_free_dataset import prepare_reference_free_dataset
from llm_trainer.data.reward_dataset import DataCollatorForReward, prepare_reward_dataset
from llm_trainer.testing import get_tokenizer, zen_dataset


def test_reward_collator_matches_trl_docstring():
    examples = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
        {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0},
    ]
    batch = DataCollatorForReward(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5, 0.0]
    without_margin = {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5]}
    no_margin = DataCollatorForReward(pad_token_id=0, pad_to_multiple_of=4)([without_margin])
    assert set(no_margin) == {"input_ids", "attention_mask"} and no_margin["input_ids"].shape == (2, 4)


def test_reward_collator_is_trls_name_at_trls_path():
    from llm_trainer.trainer.reward_trainer import DataCollatorForPreference

    assert DataCollatorForPreference is DataCollatorForReward


@pytest.mark.parametrize(
    "config_name",
    [
        "standard_preference",
        "standard_implicit_prompt_preference",
        "conversational_preference",
        "conversational_implicit_prompt_preference",
    ],
)
def test_reward_dataset_tokenizes_like_trl(config_name):
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
    from trl import RewardConfig

    tokenizer = get_tokenizer()
    dataset = zen_dataset(config_name)
    max_length = 40 if config_name.startswith("conversational") else 20  # drops some rows, not all (an error)
    ours = prepare_reward_dataset(dataset, tokenizer, max_length=max_length)
    args = RewardConfig("unused", report_to="none", max_length=max_length, bf16=False)
    trainer = trl_reward.RewardTrainer.__new__(trl_reward.RewardTrainer)
    theirs = trainer._prepare_dataset(dataset, tokenizer, args, "train")
    assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["rejected_ids"] == theirs["rejected_ids"]


def test_reward_dataset_prepends_the_explicit_prompt_and_keeps_margin():
    tokenizer = get_tokenizer()
    dataset = Dataset.from_dict(
        {"prompt": ["The sky is"], "chosen": [" blue."], "rejected": [" green."], "margin": [1.0]}
    )
    row = prepare_reward_dataset(dataset, tokenizer)[0]
    assert row["chosen_ids"] == tokenizer("The sky is blue." + tokenizer.eos_token)["input_ids"]
    assert row["rejected_ids"][-1] == tokenizer.eos_token_id
    assert row["margin"] == 1.0


def test_reward_dataset_renames_legacy_columns_and_filters_tokenized_rows():
    dataset = Dataset.from_dict({"chosen_input_ids": [[1, 2], [1, 2, 3, 4]], "rejected_input_ids": [[3], [5]]})
    with pytest.warns(FutureWarning, match="will not be supported in v1.*chosen_ids"):
        out = prepare_reward_dataset(dataset, get_tokenizer(), max_length=3)
    assert out["chosen_ids"] == [[1, 2]] and out["rejected_ids"] == [[3]]


def test_reward_dataset_names_missing_columns():
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]})
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected'.*missing: \['rejected'\]"):
        prepare_reward_dataset(dataset, get_tokenizer())


def _trl_tokenize_rows(trainer_module, config_name, tokenizer, max_length):
    """TRL experimental's own `tokenize_row` output for the zen rows (after its prompt extraction and templating)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    trainer = trainer_module.ORPOTrainer.__new__(trainer_module.ORPOTrainer)
    trainer.processing_class, trainer.is_encoder_decoder, trainer.max_length = tokenizer, False, max_length
    rows = []
    for example in zen_dataset(config_name):
        example = maybe_apply_chat_template(maybe_extract_prompt(example), tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(trainer.tokenize_row(example))
    return rows


@pytest.mark.parametrize("max_length", [1024, 16])
@pytest.mark.parametrize(
    "config_name", ["standard_preference", "conversational_preference", "conversational_implicit_prompt_preference"]
)
def test_reference_free_dataset_tokenizes_like_trl(config_name, max_length, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    tokenizer = get_tokenizer()
    ours = prepare_reference_free_dataset(zen_dataset(config_name), tokenizer, max_length=max_length)
    theirs = _trl_tokenize_rows(trl_orpo, config_name, tokenizer, max_length)
    for row, trl_row in zip(ours, theirs):
        for key in ("chosen", "rejected"):
            assert row["prompt_ids"] + row[f"{key}_ids"] == trl_row[f"{key}_input_ids"]
            assert trl_row[f"{key}_labels"] == [-100] * len(row["prompt_ids"]) + row[f"{key}_ids"]


def test_reference_free_dataset_adds_bos_and_eos_once():
    tokenizer = get_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    dataset = zen_dataset("conversational_preference").select(range(2))
    for row in prepare_reference_free_dataset(dataset, tokenizer):
        assert row["prompt_ids"][0] == tokenizer.bos_token_id and row["prompt_ids"][1] != tokenizer.bos_token_id
        # after the template's closing "<|im_end|>\n", as TRL does
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id and row["chosen_ids"][-2] != tokenizer.eos_token_id


def test_reference_free_dataset_truncates_completions_and_keeps_prompts():
    tokenizer = get_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["What is 2 plus 3? " * 4], "chosen": [" five"], "rejected": [" six"]})
    prompt_len = len(tokenizer(dataset[0]["prompt"])["input_ids"])
    row = prepare_reference_free_dataset(dataset, tokenizer, max_length=prompt_len + 1)[0]
    assert len(row["prompt_ids"]) == prompt_len and len(row["chosen_ids"]) == len(row["rejected_ids"]) == 1
    row = prepare_reference_free_dataset(dataset, tokenizer, max_length=prompt_len - 2)[0]
    assert len(row["prompt_ids"]) == prompt_len and row["chosen_ids"] == row["rejected_ids"] == []

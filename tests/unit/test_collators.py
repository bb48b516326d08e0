"""Collators shared by the trainers, against the batches TRL documents."""

import pytest
import torch

from llm_trainer.data.collators import DataCollatorForPreference, pad, truncate
from llm_trainer.modeling import completion_labels


def test_preference_collator_matches_trl_layout():
    batch = DataCollatorForPreference(pad_token_id=0)(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 8, 11, 12, 13]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_preference_collator_truncates_and_passes_reference_logps():
    examples = [
        {
            "prompt_ids": [1, 2, 3],
            "chosen_ids": [4, 5],
            "rejected_ids": [6],
            "ref_chosen_logps": -1.0,
            "ref_rejected_logps": -2.0,
        }
    ]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end")(examples)
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5], [1, 2, 3, 6]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert batch["ref_chosen_logps"].tolist() == [-1.0] and batch["ref_rejected_logps"].tolist() == [-2.0]


def test_pad_left_and_multiple():
    out = pad([torch.tensor([1, 2, 3]), torch.tensor([4])], padding_value=9, padding_side="left", pad_to_multiple_of=4)
    assert out.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]]
    with pytest.raises(ValueError, match="'left' or 'right'"):
        pad([torch.tensor([1])], padding_side="middle")


def test_truncate_modes():
    assert truncate([1, 2, 3], 2) == [1, 2] and truncate([1, 2, 3], 2, "keep_end") == [2, 3]
    assert truncate([1, 2, 3], None) == [1, 2, 3]
    with pytest.raises(ValueError, match="keep_start"):
        truncate([1], 1, "keep_middle")


def test_completion_labels_mask_prompt_and_padding():
    ids = torch.tensor([[1, 2, 3, 0]])
    labels = completion_labels(ids, torch.tensor([[0, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]]))
    assert labels.tolist() == [[-100, 2, 3, -100]]

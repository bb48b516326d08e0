"""The shared concatenated preference forward and its per-token metrics, on a stub model with known outputs."""

from __future__ import annotations

import pytest
import torch

from llm_trainer.modeling import TokenLogprobOutput
from llm_trainer.trainer.preference_forward import concatenated_forward, paired_token_metrics


class StubModel(torch.nn.Module):
    """Returns per-token log-probs of -1 at every labelled position, and records what it was called with."""

    def forward(self, input_ids, attention_mask, labels, token_logprobs):
        self.seen = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        mask = labels[:, 1:] != -100
        ones = mask.float()
        return TokenLogprobOutput(
            log_probs=-ones,
            entropy=2.0 * ones,
            is_top1=mask & (torch.arange(mask.size(1)) % 2 == 0),
            mean_logits=torch.where(torch.arange(mask.size(0))[:, None] < 2, 3.0, -1.0) * ones,
            label_mask=mask,
        )


def _batch():
    # 2 pairs; rows 0-1 chosen, rows 2-3 rejected. Completion lengths: chosen 2 and 1, rejected 1 and 3.
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return {
        "input_ids": torch.arange(20).view(4, 5),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.zeros(2),
    }


def test_concatenated_forward_splits_chosen_and_rejected():
    model = StubModel()
    forward = concatenated_forward(model, _batch())
    assert "completion_mask" not in model.seen and "ref_chosen_logps" not in model.seen
    assert (model.seen["labels"] == -100).sum() == 20 - 7  # only the 7 completion tokens are labelled
    torch.testing.assert_close(forward.chosen_logps, torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(forward.rejected_logps, torch.tensor([-1.0, -3.0]))
    averaged = concatenated_forward(model, _batch(), average=True)
    torch.testing.assert_close(averaged.rejected_logps, torch.tensor([-1.0, -1.0]))
    # LD-DPO: the second pair shares 1 token; the rejected tail (2 tokens) counts half.
    ld = concatenated_forward(model, _batch(), ld_alpha=0.5)
    torch.testing.assert_close(ld.rejected_logps, torch.tensor([-1.0, -2.0]))


def test_average_and_ld_alpha_are_exclusive():
    with pytest.raises(ValueError, match="exclusive"):
        concatenated_forward(StubModel(), _batch(), average=True, ld_alpha=0.5)


def test_paired_token_metrics():
    metrics = paired_token_metrics(concatenated_forward(StubModel(), _batch()))
    assert metrics["entropy"] == pytest.approx(2.0)
    assert metrics["logits/chosen"] == pytest.approx(3.0)
    assert metrics["logits/rejected"] == pytest.approx(-1.0)
    # Chosen completion tokens sit at shifted positions 1, 2 (row 0) and 0 (row 1); even positions are top-1.
    assert metrics["mean_token_accuracy"] == pytest.approx(2 / 3)
    batch = _batch()
    batch["completion_mask"][:2] = 0  # no chosen tokens: the chosen-side metrics are 0.0, as in TRL
    empty = paired_token_metrics(concatenated_forward(StubModel(), batch))
    assert empty["logits/chosen"] == 0.0 and empty["mean_token_accuracy"] == 0.0

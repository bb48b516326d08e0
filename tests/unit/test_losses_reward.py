"""Reward-model loss and metrics against TRL 1.16's own `RewardTrainer.compute_loss`, run on a stand-in trainer whose
model returns fixed scores."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llm_trainer.losses import reward_model_loss, reward_model_metrics

B = 6
ATOL = 1e-6


def trl_reward(scores: torch.Tensor, margin: torch.Tensor | None, coefficient: float | None):
    from trl.trainer.reward_trainer import RewardTrainer

    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=coefficient),
        accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * B, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=scores), inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coefficient", [None, 0.0, 0.01, 2.5])
def test_reward_loss_matches_trl(with_margin, coefficient):
    gen = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(2 * B, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    margin = torch.rand(B, generator=gen, dtype=torch.float64) if with_margin else None
    their_loss, their_metrics = trl_reward(scores, margin, coefficient)
    chosen, rejected = scores.squeeze(-1).chunk(2)
    ours = reward_model_loss(chosen, rejected, margin, coefficient)

    torch.testing.assert_close(ours, their_loss, rtol=0, atol=ATOL)
    our_metrics = reward_model_metrics(chosen, rejected)
    assert set(our_metrics) == set(their_metrics) - {"num_tokens"}
    for key, value in our_metrics.items():
        assert value == pytest.approx(their_metrics[key], abs=ATOL), key
    their_grad, our_grad = (torch.autograd.grad(loss, scores)[0] for loss in (their_loss, ours))
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=ATOL)


def test_reward_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([1.0, -1.5])
    # differences 0 and 2; with margin 2 the second pair is back to 0
    assert reward_model_loss(chosen, rejected, torch.tensor([0.0, 2.0])).item() == pytest.approx(math.log(2))
    # centring uses the squared sum of each pair, (2² + (−1)²)/2, not the sum of squares
    centred = reward_model_loss(chosen, rejected, torch.tensor([0.0, 2.0]), center_rewards_coefficient=0.1)
    assert centred.item() == pytest.approx(math.log(2) + 0.1 * 2.5)


def test_reward_metrics_by_hand_and_gather():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    assert reward_model_metrics(chosen, rejected) == pytest.approx(
        {"min_reward": -1.0, "mean_reward": 0.5, "max_reward": 2.0, "accuracy": 0.5, "margin": 0.0}
    )
    # a second process with perfect accuracy: accuracy is the mean of the per-process means
    gathered = reward_model_metrics(
        chosen, rejected, gather=lambda t: torch.cat([t.reshape(-1), torch.ones(1) if t.dim() == 0 else t])
    )
    assert gathered["accuracy"] == 0.75

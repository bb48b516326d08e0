"""`xpo_loss` and `nash_md_loss` against plain per-example computations."""

from __future__ import annotations

import math

import pytest
import torch

from llm_trainer.losses import nash_md_loss, xpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_loss_matches_a_plain_computation(loss_type):
    torch.manual_seed(0)
    pp, pr, rp, rr = (torch.randn(6, dtype=torch.float64) * 3 for _ in range(4))
    chosen = torch.tensor([True, False, True, True, False, False])
    beta, alpha = 0.3, 0.05
    loss, dpo, bonus = xpo_loss(pp, pr, rp, rr, chosen, beta=beta, alpha=alpha, loss_type=loss_type)
    for i in range(6):
        if chosen[i]:
            logits = (pp[i] - rp[i]) - (pr[i] - rr[i])
        else:
            logits = (pr[i] - rr[i]) - (pp[i] - rp[i])
        logits = logits.item()
        expected = -_log_sigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
        assert dpo[i].item() == pytest.approx(expected, rel=1e-9)
        assert bonus[i].item() == pytest.approx(alpha * pr[i].item(), rel=1e-12)
        assert loss[i].item() == pytest.approx(expected + alpha * pr[i].item(), rel=1e-9)


def test_xpo_loss_gradient_of_the_bonus():
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    zero = torch.zeros(2)
    loss, _, _ = xpo_loss(zero, pr, zero, pr.detach(), torch.tensor([True, True]), beta=0.1, alpha=0.5)
    loss.sum().backward()
    # d/dpr of -logsigmoid(beta * (0 - (pr - pr_ref))) + alpha * pr = beta * sigmoid(0) + alpha, at pr == pr_ref
    assert pr.grad.tolist() == pytest.approx([0.1 * 0.5 + 0.5] * 2, rel=1e-6)


def test_xpo_loss_refuses_an_unknown_loss_type():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        xpo_loss(x, x, x, x, torch.tensor([True]), beta=0.1, alpha=0.1, loss_type="hinge")


def test_nash_md_loss_matches_a_plain_computation():
    torch.manual_seed(1)
    policy = (torch.randn(3, 5, dtype=torch.float64) - 2).requires_grad_(True)
    ref = torch.randn(3, 5, dtype=torch.float64) - 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    probability = torch.tensor([0.2, 0.7, 0.5], dtype=torch.float64)
    beta = 0.4
    loss, score, kl = nash_md_loss(policy, ref, mask, probability, beta=beta)
    for i in range(3):
        n = int(mask[i].sum())
        p, r = policy[i, :n].tolist(), ref[i, :n].tolist()
        plain_score = (probability[i].item() - 0.5) * sum(p)
        plain_kl = sum(a - b for a, b in zip(p, r))
        plain_kl_term = sum((a - b) * a for a, b in zip(p, r))
        assert score[i].item() == pytest.approx(plain_score, rel=1e-9, abs=1e-12)
        assert kl[i].item() == pytest.approx(plain_kl, rel=1e-9)
        assert loss[i].item() == pytest.approx(beta * plain_kl_term - plain_score, rel=1e-9)
    # the log-ratio is a constant (REINFORCE): d loss / d policy_t = beta * (policy_t - ref_t) - (probability - 0.5)
    loss.sum().backward()
    expected = (beta * (policy.detach() - ref) - (probability[:, None] - 0.5)) * mask
    torch.testing.assert_close(policy.grad, expected, rtol=1e-9, atol=1e-12)

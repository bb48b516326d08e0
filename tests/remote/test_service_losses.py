"""The remote service's loss maths (`llm_trainer.losses.service`), checked without a server against torch's
cross-entropy and GRPO's `dapo` loss (`losses.policy_gradient.grpo_loss`)."""

import pytest
import torch

from llm_trainer.losses import policy_gradient as pg
from llm_trainer.losses.service import (
    cross_entropy_loss,
    importance_sampling_loss,
    ppo_loss,
    service_loss,
)


def _grad(fn, logprobs):
    logprobs = logprobs.clone().requires_grad_(True)
    loss = fn(logprobs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad


def test_cross_entropy_is_the_weighted_sum_of_token_nll():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 11), torch.randint(0, 11, (7,))
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    weights = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1]) / 5  # prompt tokens out, token mean over the rest
    expected = torch.nn.functional.cross_entropy(logits[2:], targets[2:])
    torch.testing.assert_close(cross_entropy_loss(logprobs, weights), expected)
    torch.testing.assert_close(cross_entropy_loss(logprobs, torch.ones(7)), -logprobs.sum())


def test_importance_sampling_value_and_gradient():
    torch.manual_seed(1)
    logprobs, sampling, advantages = -torch.rand(9), -torch.rand(9), torch.randn(9)
    loss, grad = _grad(lambda lp: importance_sampling_loss(lp, sampling, advantages), logprobs)
    ratio = torch.exp(logprobs - sampling)
    torch.testing.assert_close(loss, -(ratio * advantages).sum())
    torch.testing.assert_close(grad, -ratio * advantages)
    on_policy, _ = _grad(lambda lp: importance_sampling_loss(lp, lp.detach(), advantages), logprobs)
    torch.testing.assert_close(on_policy, -advantages.sum())


def _grpo_case(seed: int):
    torch.manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    logprobs = -torch.rand(3, 4) * 2
    old = logprobs + torch.randn(3, 4) * 0.4  # off-policy enough that some ratios leave [0.8, 1.2]
    advantages = torch.randn(3)
    return logprobs, old, advantages, mask


def _flat(per_token, mask):
    return per_token[mask.bool()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_with_token_scaled_advantages_is_grpos_dapo_loss(seed):
    """Σ_tokens ppo(A / N) == GRPO's dapo loss (token sum / N) with ε = 0.2, in value and gradient."""
    logprobs, old, advantages, mask = _grpo_case(seed)
    n = mask.sum()
    token_adv = (advantages[:, None] * mask / n).expand_as(mask)

    def ours(lp):
        return ppo_loss(_flat(lp, mask), _flat(old, mask), _flat(token_adv, mask), 0.8, 1.2)

    def grpo(lp):
        return pg.grpo_loss(lp, old, advantages, mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2).loss

    ratio = torch.exp(logprobs - old)[mask.bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).any()  # the clipping is exercised
    loss, grad = _grad(ours, logprobs)
    expected, expected_grad = _grad(grpo, logprobs)
    scale = expected.abs().clamp(min=1e-3)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6 * scale.item())
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_importance_sampling_on_policy_has_grpos_dapo_gradient():
    """On-policy (sampler = policy), −Σ exp(logp − sg(logp))·A/N has the dapo loss's value and gradient."""
    logprobs, _, advantages, mask = _grpo_case(3)
    n = mask.sum()
    token_adv = advantages[:, None].expand_as(mask) / n

    def ours(lp):
        return importance_sampling_loss(_flat(lp, mask), _flat(lp, mask).detach(), _flat(token_adv, mask))

    def grpo(lp):
        return pg.grpo_loss(lp, None, advantages, mask, loss_type="dapo").loss

    loss, grad = _grad(ours, logprobs)
    expected, expected_grad = _grad(grpo, logprobs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_service_loss_dispatch_and_errors():
    lp, other, adv = -torch.rand(4), -torch.rand(4), torch.randn(4)
    inputs = {"target_tokens": torch.arange(4), "logprobs": other, "advantages": adv, "weights": torch.ones(4)}
    torch.testing.assert_close(service_loss("cross_entropy", lp, inputs), -lp.sum())
    torch.testing.assert_close(
        service_loss("importance_sampling", lp, inputs), importance_sampling_loss(lp, other, adv)
    )
    torch.testing.assert_close(
        service_loss("ppo", lp, inputs, {"clip_low_threshold": 0.9}), ppo_loss(lp, other, adv, 0.9, 1.2)
    )
    with pytest.raises(ValueError, match="loss_fn must be one of cross_entropy, importance_sampling, ppo"):
        service_loss("mse", lp, inputs)
    with pytest.raises(ValueError, match=r"needs loss_fn_inputs \['advantages'\]"):
        service_loss("ppo", lp, {"logprobs": other})
    with pytest.raises(ValueError, match=r"\['clip'\] are not options of 'ppo'"):
        service_loss("ppo", lp, inputs, {"clip": 0.1})
    with pytest.raises(ValueError, match="not options of 'cross_entropy'"):
        service_loss("cross_entropy", lp, inputs, {"clip_low_threshold": 0.8})
    with pytest.raises(ValueError, match="clip_low_threshold <= 1 <= clip_high_threshold"):
        ppo_loss(lp, other, adv, 1.1, 1.2)

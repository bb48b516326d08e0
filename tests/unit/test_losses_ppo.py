"""PPO loss maths against TRL 1.12's `PPOTrainer.train` (the last TRL release with PPO).

TRL 1.12 cannot be installed next to TRL 1.16 (same package name), and its PPO maths is written inline in
`PPOTrainer.train` rather than as functions, so the reference below transcribes those formulas from
`trl/experimental/ppo/ppo_trainer.py` of TRL 1.12.0 (steps "4. compute rewards" to "6. compute advantages and
returns", and the mini-batch loss). `first_true_indices` is TRL's own (unchanged in 1.16).
"""

import math

import pytest
import torch
from trl.experimental.utils import first_true_indices as trl_first_true_indices

from llm_trainer.losses.ppo import (
    INVALID_LOGPROB,
    first_true_indices,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_padding_masks,
    whiten_rewards,
)

PAD = 0
B, T = 6, 10


# ---------------------------------------------------------------- TRL 1.12 reference (transcribed formulas)
def ref_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def ref_masked_var(values, mask, unbiased=True):
    mean = ref_masked_mean(values, mask)
    variance = ref_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def ref_masked_whiten(values, mask, shift_mean=True):
    mean, var = ref_masked_mean(values, mask), ref_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def ref_rollout(batch, kl_coef, kl_estimator, whiten_rewards, gamma, lam):
    """TRL 1.12 `train()`: masks, KL-shaped rewards, optional reward whitening, GAE."""
    responses = batch["responses"]
    sequence_lengths = trl_first_true_indices(responses == PAD) - 1
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(batch["logprobs"], padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(batch["ref_logprobs"], padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(batch["values"], padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += batch["scores"]
    if whiten_rewards:
        rewards = ref_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = ref_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return {
        "sequence_lengths": sequence_lengths,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "logprobs": logprobs,
        "values": values,
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
    }


def ref_minibatch_loss(new_logprobs, vpred, mb, cliprange, cliprange_value, vf_coef):
    """TRL 1.12 `train()`: the loss and statistics of one micro-batch."""
    new_logprobs = torch.masked_fill(new_logprobs, mb["padding_mask"], INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, mb["padding_mask_p1"], 0)
    vpredclipped = torch.clamp(vpred, mb["values"] - cliprange_value, mb["values"] + cliprange_value)
    vf_losses1 = torch.square(vpred - mb["returns"])
    vf_losses2 = torch.square(vpredclipped - mb["returns"])
    vf_loss = 0.5 * ref_masked_mean(torch.max(vf_losses1, vf_losses2), ~mb["padding_mask_p1"])
    vf_clipfrac = ref_masked_mean((vf_losses2 > vf_losses1).float(), ~mb["padding_mask_p1"])
    logprobs_diff = new_logprobs - mb["logprobs"]
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb["advantages"] * ratio
    pg_losses2 = -mb["advantages"] * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = ref_masked_mean(torch.max(pg_losses, pg_losses2), ~mb["padding_mask"])
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = ref_masked_mean((pg_losses2 > pg_losses).float(), ~mb["padding_mask"])
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return loss, pg_loss, vf_loss, vf_clipfrac, pg_clipfrac, approxkl, ratio.mean()


# ---------------------------------------------------------------- fixtures
def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """Responses of every shape: stopped early (pad after), filling the width, one token, and empty."""
    gen = torch.Generator().manual_seed(seed)
    responses = torch.randint(1, 50, (B, T), generator=gen)
    for row, first_pad in {0: 4, 1: T, 2: 1, 3: 0, 4: T - 1, 5: 7}.items():
        responses[row, first_pad:] = PAD
    logprobs = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    return {
        "responses": responses,
        "logprobs": logprobs,
        "ref_logprobs": logprobs + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "values": torch.randn(B, T, generator=gen, dtype=torch.float64),
        "scores": 2 * torch.randn(B, generator=gen, dtype=torch.float64),
    }


def ours_rollout(batch, kl_coef, kl_estimator, whiten, gamma, lam):
    sequence_lengths = first_true_indices(batch["responses"] == PAD) - 1
    padding_mask, padding_mask_p1 = response_padding_masks(sequence_lengths, T)
    values = batch["values"].masked_fill(padding_mask_p1, 0.0)
    shaped = kl_shaped_rewards(
        batch["logprobs"],
        batch["ref_logprobs"],
        batch["scores"],
        sequence_lengths,
        padding_mask,
        kl_coef,
        kl_estimator,
    )
    rewards = whiten_rewards(shaped.rewards, padding_mask_p1) if whiten else shaped.rewards
    advantages, returns = gae_advantages(rewards, values, padding_mask, gamma, lam)
    return {
        "sequence_lengths": sequence_lengths,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "values": values,
        "kl": shaped.kl,
        "non_score_reward": shaped.non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
    }


# ---------------------------------------------------------------- tests
def test_first_true_indices_matches_trl():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]
    batch = make_batch(0)
    assert torch.equal(
        first_true_indices(batch["responses"] == PAD), trl_first_true_indices(batch["responses"] == PAD)
    )


def test_masked_statistics_match_trl_and_definitions():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    kept = values[mask]
    torch.testing.assert_close(masked_mean(values, mask), kept.mean())
    torch.testing.assert_close(masked_mean(values, mask, axis=1), ref_masked_mean(values, mask, axis=1))
    torch.testing.assert_close(masked_var(values, mask), kept.var())
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), kept.var(unbiased=False))
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, ref_masked_whiten(values, mask))
    torch.testing.assert_close(whitened[mask].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(whitened[mask].std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), ref_masked_whiten(values, mask, shift_mean=False)
    )


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.ones(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


def test_padding_masks():
    padding_mask, padding_mask_p1 = response_padding_masks(torch.tensor([2, -1, 4]), 5)
    assert padding_mask.int().tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert padding_mask_p1.int().tolist() == [[0, 0, 0, 0, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5)])
def test_rollout_maths_match_trl(kl_estimator, whiten, gamma, lam):
    batch = make_batch(2)
    ours = ours_rollout(batch, 0.05, kl_estimator, whiten, gamma, lam)
    ref = ref_rollout(batch, 0.05, kl_estimator, whiten, gamma, lam)
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], msg=key)


def test_kl_shaped_rewards_place_the_score():
    """Score one step after the last token, or on the last token of a response that fills the width."""
    logprobs = torch.zeros(3, 4)
    out = kl_shaped_rewards(
        logprobs, logprobs, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 3, -1]), torch.zeros(3, 4).bool(), 0.1
    )
    assert out.rewards.tolist() == [[0, 0, 1, 0], [0, 0, 0, 2], [3, 0, 0, 0]]

    def one_token(kl_estimator):  # logπ = −1, logπ_ref = −2
        zero = torch.zeros(1, 1)
        return kl_shaped_rewards(zero - 1, zero - 2, zero[0], torch.tensor([0]), zero.bool(), 0.5, kl_estimator)

    k1, k3 = one_token("k1"), one_token("k3")
    assert k1.kl.item() == pytest.approx(1.0) and k1.non_score_reward.item() == pytest.approx(-0.5)
    assert k3.kl.item() == pytest.approx(math.exp(-1.0))  # e^-1 - 1 + 1
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_shaped_rewards(logprobs, logprobs, torch.zeros(3), torch.tensor([1, 1, 1]), logprobs.bool(), 0.1, "k2")


def test_gae_returns_are_reward_to_go_without_discount():
    """With γ = λ = 1 the returns telescope to the sum of future rewards, whatever the values."""
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    advantages, returns = gae_advantages(rewards, values, torch.zeros(3, 5).bool(), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, rewards.flip(1).cumsum(1).flip(1))
    assert advantages.mean().abs() < 1e-6 and (advantages.std() - 1).abs() < 1e-4  # whitened


def test_policy_loss_matches_trl_with_gradients():
    rollout = ours_rollout(make_batch(4), 0.05, "k1", False, 1.0, 0.95)
    rollout["logprobs"] = make_batch(4)["logprobs"].masked_fill(rollout["padding_mask"], INVALID_LOGPROB)
    gen = torch.Generator().manual_seed(5)
    new = (rollout["logprobs"] + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    vpred = (rollout["values"] + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    new_ref, vpred_ref = new.detach().clone().requires_grad_(), vpred.detach().clone().requires_grad_()

    policy = ppo_policy_loss(new, rollout["logprobs"], rollout["advantages"], rollout["padding_mask"], 0.2)
    vf_loss, vf_clipfrac = ppo_value_loss(
        vpred.masked_fill(rollout["padding_mask_p1"], 0.0),
        rollout["values"],
        rollout["returns"],
        rollout["padding_mask_p1"],
        0.2,
    )
    loss = policy.loss + 0.1 * vf_loss
    loss.backward()
    expected = ref_minibatch_loss(new_ref, vpred_ref, rollout, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    expected[0].backward()

    ref_loss, ref_pg, ref_vf, ref_vf_clipfrac, ref_clipfrac, ref_approxkl, ref_ratio = expected
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(policy.loss, ref_pg)
    torch.testing.assert_close(vf_loss, ref_vf)
    torch.testing.assert_close(vf_clipfrac, ref_vf_clipfrac)
    torch.testing.assert_close(policy.clipfrac, ref_clipfrac)
    torch.testing.assert_close(policy.approxkl, ref_approxkl)
    torch.testing.assert_close(policy.ratio, ref_ratio)
    torch.testing.assert_close(new.grad, new_ref.grad)
    torch.testing.assert_close(vpred.grad, vpred_ref.grad)
    assert 0 < policy.clipfrac < 1 and 0 < vf_clipfrac < 1  # both clipping branches are exercised
    assert new.grad[rollout["padding_mask"]].abs().max() == 0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    advantages = torch.tensor([[1.0, -2.0, 5.0], [3.0, 0.0, 0.0]])
    padding_mask = torch.tensor([[False, False, True], [False, True, True]])
    logprobs = torch.tensor([[-1.0, -2.0, INVALID_LOGPROB], [-0.5, INVALID_LOGPROB, INVALID_LOGPROB]])
    out = ppo_policy_loss(logprobs, logprobs, advantages, padding_mask, 0.2)
    assert out.loss.item() == pytest.approx(-(1.0 - 2.0 + 3.0) / 3)
    assert out.clipfrac.item() == 0 and out.approxkl.item() == 0 and out.ratio.item() == 1

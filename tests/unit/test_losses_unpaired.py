"""KTO against TRL 1.16's own `KTOTrainer._compute_loss`; BCO against TRL 1.13's formulas.

BCO left TRL in 1.14 and TRL 1.13 is not installed next to 1.16, so its reference is TRL 1.13's
`trl/experimental/bco/bco_trainer.py` rewritten line by line below (`RunningMoments.update`, lines 131-156;
`_get_udm_weight`, lines 1216-1223; `bco_loss`, lines 1225-1279; the nanmean, line 1369).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.losses import (
    RunningMoments,
    bco_loss,
    density_ratio_weights,
    kto_kl,
    kto_loss,
    sequence_logps,
    unpaired_metrics,
)

N, T = 7, 10
ATOL = 1e-6


def make_batch(seed: int, labels: list[bool]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def completion_mask() -> torch.Tensor:
        mask = torch.zeros(N, T, dtype=torch.long)
        for row in range(N):
            prompt = int(torch.randint(1, 4, (1,), generator=gen))
            mask[row, prompt : prompt + int(torch.randint(1, T - prompt + 1, (1,), generator=gen))] = 1
        return mask

    def per_token(mask: torch.Tensor) -> torch.Tensor:
        return -2.0 * torch.rand(N, T - 1, generator=gen, dtype=torch.float64) * mask[:, 1:]

    mask, kl_mask = completion_mask(), completion_mask()
    return {
        "label": torch.tensor(labels),
        "completion_mask": mask,
        "KL_completion_mask": kl_mask,
        "policy": per_token(mask),
        "ref": per_token(mask),
        "kl_policy": per_token(kl_mask),
        "kl_ref": per_token(kl_mask) - 0.3 * kl_mask[:, 1:],  # a positive KL estimate, so the clamp is inactive
    }


class _FakeLM(torch.nn.Module):
    """Returns preset per-token log-probs for the main or the KL sequences, as TRL's fused LM head would."""

    is_gradient_checkpointing = False

    def __init__(self, batch_inputs: dict, log_probs: torch.Tensor, kl_log_probs: torch.Tensor):
        super().__init__()
        self.batch_inputs, self.log_probs, self.kl_log_probs = batch_inputs, log_probs, kl_log_probs

    def forward(self, input_ids, **kwargs):
        log_probs = self.kl_log_probs if input_ids is self.batch_inputs["KL_input_ids"] else self.log_probs
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def trl_kto(batch: dict, policy: torch.Tensor, **options) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics from TRL 1.16's `KTOTrainer._compute_loss`."""
    from trl.trainer.kto_trainer import KTOTrainer

    config = {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0, **options}
    mask, kl_mask = batch["completion_mask"], batch["KL_completion_mask"]
    inputs = {
        "input_ids": mask.clone(),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": kl_mask.clone(),
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": batch["label"],
    }
    trainer = SimpleNamespace(
        model=_FakeLM(inputs, policy, batch["kl_policy"]),
        ref_model=_FakeLM(inputs, batch["ref"], batch["kl_ref"]),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        calculate_KL=config["loss_type"] == "kto",
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **config,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    loss = KTOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def ours_kto(batch: dict, policy: torch.Tensor, **options):
    labels, mask, kl_mask = batch["label"], batch["completion_mask"][:, 1:], batch["KL_completion_mask"][:, 1:]
    logps, ref_logps = sequence_logps(policy, mask), sequence_logps(batch["ref"], mask)
    kl = kto_kl(sequence_logps(batch["kl_policy"], kl_mask), sequence_logps(batch["kl_ref"], kl_mask))
    out = kto_loss(logps[labels], logps[~labels], ref_logps[labels], ref_logps[~labels], kl, **options)
    metrics = unpaired_metrics(out.chosen_rewards, out.rejected_rewards, logps[labels], logps[~labels])
    return out, {**metrics, "kl": kl.item()}


LABELS = {
    "mixed": [True, False, False, True, True, False, True],
    "all_desirable": [True] * N,
    "all_undesirable": [False] * N,
}


@pytest.mark.parametrize("labels", LABELS, ids=list(LABELS))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta": 0.7, "desirable_weight": 1.33, "undesirable_weight": 0.5},
        {"loss_type": "apo_zero_unpaired", "beta": 0.4, "undesirable_weight": 2.0},
    ],
    ids=["kto", "kto_weighted", "apo_zero_unpaired"],
)
def test_kto_matches_trl(labels, options):
    batch = make_batch(0, LABELS[labels])
    theirs_policy = batch["policy"].clone().requires_grad_()
    ours_policy = batch["policy"].clone().requires_grad_()
    their_loss, their_metrics = trl_kto(batch, theirs_policy, **options)
    ours, our_metrics = ours_kto(batch, ours_policy, **options)

    torch.testing.assert_close(ours.loss, their_loss, rtol=0, atol=ATOL)
    assert our_metrics["kl"] > 0.1
    if options.get("loss_type") == "apo_zero_unpaired":
        our_metrics.pop("kl")  # no reference point: TRL logs a constant 0
        assert their_metrics.pop("kl") == 0.0
    assert set(our_metrics) == set(their_metrics) - {"entropy", "num_tokens", "logits/chosen", "logits/rejected"}
    for key, value in our_metrics.items():
        assert value == pytest.approx(their_metrics[key], abs=ATOL), key
    (their_grad,) = torch.autograd.grad(their_loss, theirs_policy)
    (our_grad,) = torch.autograd.grad(ours.loss, ours_policy)
    mask = batch["completion_mask"][:, 1:].bool()
    torch.testing.assert_close(our_grad[mask], their_grad[mask], rtol=0, atol=ATOL)


def test_kto_kl_is_clamped_at_zero_and_averaged_over_processes():
    high, low = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    assert kto_kl(high, low).item() == 2.0
    assert kto_kl(low, high).item() == 0.0
    # two processes whose local means are 2 and −4: the global mean −1 is clamped to 0, not averaged after clamping
    assert kto_kl(high, low, gather=lambda t: torch.stack([t, torch.tensor(-4.0)])).item() == 0.0
    assert kto_kl(high, low, gather=lambda t: torch.stack([t, torch.tensor(1.0)])).item() == 1.5


def test_kto_by_hand():
    zero = torch.zeros(1, dtype=torch.float64)
    out = kto_loss(zero, zero, zero, zero, kl=torch.tensor(0.0), beta=1.0, desirable_weight=3.0)
    assert out.loss.item() == pytest.approx((3.0 * 0.5 + 0.5) / 2)
    apo = kto_loss(zero + 2.0, zero, zero, zero, beta=0.5, loss_type="apo_zero_unpaired")
    assert apo.loss.item() == pytest.approx(((1 - 1 / (1 + math.e**-1)) + 0.5) / 2)


def test_nan_completions_are_left_out_of_the_mean():
    logps = torch.tensor([-1.0, float("nan"), -3.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    kto = kto_loss(logps[:1], logps[1:], zero[:1], zero[1:], kl=torch.tensor(0.0), beta=1.0)
    assert kto.loss.item() == pytest.approx((1 - 1 / (1 + math.e)) / 2 + (1 - 1 / (1 + math.e**-3)) / 2)
    bco = bco_loss(logps[:1], logps[1:], zero[:1], zero[1:], RunningMoments(), beta=1.0, update_running=False)
    assert bco.loss.item() == pytest.approx((math.log1p(math.e) + math.log1p(math.e**-3)) / 2)


def test_kto_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="Valid loss types: kto, apo_zero_unpaired"):
        kto_loss(x, x, x, x, torch.tensor(0.0), loss_type="bco")
    with pytest.raises(ValueError, match="needs `kl`"):
        kto_loss(x, x, x, x)


# BCO: TRL 1.13's arithmetic, rewritten line by line as the reference
def reference_running_update(state: dict, xs: torch.Tensor) -> None:
    xs_count = xs.numel()
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_mean, xs_var = xs_mean.float(), xs_var.float()
    delta = xs_mean - state["mean"]
    tot_count = state["count"] + xs_count
    new_sum = xs_var * xs_count
    old_sum = state["var"] * state["count"] + delta**2 * state["count"] * xs_count / tot_count
    tot_sum = old_sum + new_sum
    state["mean"] += (delta * xs_count / tot_count).item()
    new_var = tot_sum / tot_count
    state["std"] = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
    state["var"] = new_var.item()
    state["count"] = tot_count


def reference_bco(state, beta, policy_c, policy_r, ref_c, ref_r, prob_desirable=None, do_train=True):
    chosen_rewards = beta * (policy_c - ref_c)
    rejected_rewards = beta * (policy_r - ref_r)
    if do_train:
        reference_running_update(state, torch.cat((chosen_rewards, rejected_rewards), 0).detach())
    delta = torch.as_tensor(state["mean"], device=chosen_rewards.device)
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    if prob_desirable is not None:
        weight = (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(min=0.5, max=10.0)
        losses = torch.cat((torch.ones_like(chosen_losses) * chosen_losses, weight * rejected_losses), dim=0)
    else:
        losses = torch.cat((chosen_losses, rejected_losses), dim=0)
    return losses.nanmean(), chosen_rewards, rejected_rewards, delta


@pytest.mark.parametrize("udm", [False, True])
def test_bco_matches_trl_over_several_steps(udm):
    gen = torch.Generator().manual_seed(1)
    state = {"mean": 0.0, "std": 1.0, "var": 1.0, "count": 1e-24}
    running = RunningMoments()
    for step in range(4):
        n_chosen, n_rejected = 3 + step % 2, 4 - step % 3
        logps = [torch.randn(n, generator=gen, dtype=torch.float64) * 5 for n in (n_chosen, n_rejected) * 2]
        policy_c, policy_r, ref_c, ref_r = logps
        policy_c.requires_grad_()
        prob = torch.rand(n_rejected, generator=gen, dtype=torch.float64) if udm else None
        do_train = step != 2  # an evaluation step leaves the running mean alone
        expected = reference_bco(state, 0.2, policy_c, policy_r, ref_c, ref_r, prob, do_train)
        ours = bco_loss(
            policy_c,
            policy_r,
            ref_c,
            ref_r,
            running,
            beta=0.2,
            update_running=do_train,
            rejected_weights=density_ratio_weights(prob) if udm else None,
        )
        torch.testing.assert_close(ours.loss, expected[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.chosen_rewards, expected[1].detach())
        torch.testing.assert_close(ours.delta, expected[3])
        assert (running.mean, running.var, running.std, running.count) == tuple(
            state[k] for k in ("mean", "var", "std", "count")
        )
        (expected_grad,) = torch.autograd.grad(expected[0], policy_c)
        (our_grad,) = torch.autograd.grad(ours.loss, policy_c)
        torch.testing.assert_close(our_grad, expected_grad, rtol=0, atol=ATOL)


def test_running_moments_track_the_whole_stream():
    gen = torch.Generator().manual_seed(2)
    running, seen = RunningMoments(), []
    for size in (5, 1, 8, 3):
        batch = torch.randn(size, generator=gen, dtype=torch.float64) * 2 + 1
        seen.append(batch)
        running.update(batch)
    stream = torch.cat(seen)
    assert running.mean == pytest.approx(stream.mean().item(), rel=1e-6)
    assert running.var == pytest.approx(stream.var(unbiased=False).item(), rel=1e-6)
    assert running.std == pytest.approx(stream.std(unbiased=True).item(), rel=1e-6)
    assert running.count == pytest.approx(17)


def test_running_moments_distributed_path_agrees_with_local():
    xs = torch.tensor([0.5, -1.0, 2.0, 4.0])
    local, distributed = RunningMoments(), RunningMoments()
    local.update(xs)
    distributed.update(xs, reduce_sum=lambda t: t)  # one process: the sum-reduction is the identity
    assert distributed.mean == pytest.approx(local.mean) and distributed.var == pytest.approx(local.var)


def test_bco_by_hand_and_density_ratio_clamp():
    zero = torch.zeros(1, dtype=torch.float64)
    running = RunningMoments()
    out = bco_loss(zero + 1.0, zero, zero, zero, running, beta=1.0)
    # rewards 1 and 0, δ = 0.5: both terms are −logσ(0.5)
    assert out.delta.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    weights = density_ratio_weights(torch.tensor([0.01, 0.5, 0.75, 0.999]))
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0, 3.0, 10.0]))

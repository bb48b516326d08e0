"""ORPO and CPO (SimPO, AlphaPO) against TRL 1.16's own `trl.experimental` trainer methods.

`get_batch_loss_metrics` runs on a stand-in trainer whose `concatenated_forward` returns fixed sequence log-probs and
NLL, so the reference is TRL's `odds_ratio_loss` / `cpo_loss` and its loss assembly and metrics, unchanged.
"""

import decimal
import math
from types import SimpleNamespace

import pytest
import torch

from llm_trainer.losses import CPO_LOSS_TYPES, alphapo_reward, cpo_loss, log1mexp, odds_ratio_loss, preference_metrics

B = 6
ATOL = 1e-6


def make_inputs(seed: int, dtype: torch.dtype, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    chosen = -scale * torch.rand(B, generator=gen, dtype=dtype) - 0.01
    rejected = -scale * torch.rand(B, generator=gen, dtype=dtype) - 0.01
    nll = torch.rand((), generator=gen, dtype=dtype) + 1.0
    return chosen, rejected, nll


def run_trl(trainer_cls, loss_method: str, chosen, rejected, nll, **attributes):
    logits = torch.zeros(B, 3, 4)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        concatenated_forward=lambda model, batch: (chosen, rejected, logits, logits, nll),
        **attributes,
    )
    setattr(trainer, loss_method, getattr(trainer_cls, loss_method).__get__(trainer))
    return trainer_cls.get_batch_loss_metrics(trainer, None, {})


def assert_metrics_match(ours: dict, theirs: dict) -> None:
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key], abs=ATOL), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 1.5])
def test_orpo_matches_trl(dtype, beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected, nll = make_inputs(0, dtype)
    chosen.requires_grad_()
    their_loss, their_metrics = run_trl(ORPOTrainer, "odds_ratio_loss", chosen, rejected, nll, beta=beta)
    ours = odds_ratio_loss(chosen, rejected, nll, beta=beta)

    # TRL computes in float32 whatever the input; ours keeps float64 inputs in float64
    torch.testing.assert_close(ours.loss.float(), their_loss.float(), rtol=0, atol=ATOL)
    metrics = preference_metrics(ours.chosen_rewards, ours.rejected_rewards, chosen, rejected)
    metrics |= {"nll_loss": nll.item(), "log_odds_ratio": ours.log_odds_ratio.item()}
    metrics["log_odds_chosen"] = ours.log_odds_chosen.item()
    assert_metrics_match(metrics, their_metrics)
    (their_grad,) = torch.autograd.grad(their_loss, chosen)
    (our_grad,) = torch.autograd.grad(ours.loss, chosen)
    torch.testing.assert_close(our_grad.float(), their_grad.float(), rtol=0, atol=ATOL)


def test_orpo_by_hand():
    # p_c = 0.5, p_r = 0.25: odds 1 and 1/3, log odds ratio log 3
    chosen, rejected = torch.tensor([math.log(0.5)], dtype=torch.float64), torch.tensor([math.log(0.25)])
    out = odds_ratio_loss(chosen, rejected.double(), torch.tensor(2.0, dtype=torch.float64), beta=0.5)
    assert out.log_odds_chosen.item() == pytest.approx(math.log(3))
    assert out.log_odds_ratio.item() == pytest.approx(-math.log1p(1 / 3))
    assert out.loss.item() == pytest.approx(2.0 + 0.5 * math.log1p(1 / 3))
    assert out.loss.dtype == torch.float64
    assert odds_ratio_loss(chosen.half(), rejected.half(), torch.tensor(0.0)).loss.dtype == torch.float32


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-10, -0.1, -math.log(2), -5.0, -50.0], dtype=torch.float64)
    with decimal.localcontext(decimal.Context(prec=50)):
        expected = torch.tensor([float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=0)


CPO_CASES = [
    {"loss_type": loss_type, "alpha": alpha, "label_smoothing": smoothing, "cpo_alpha": cpo_alpha}
    for loss_type in CPO_LOSS_TYPES
    for alpha in (0.0, 0.4, -0.3)
    for smoothing, cpo_alpha in ((0.0, 0.5), (0.2, 0.0))
]


@pytest.mark.parametrize("case", CPO_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cpo_matches_trl(case):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected, nll = make_inputs(1, torch.float64)
    chosen.requires_grad_()
    trl_nll = nll if case["cpo_alpha"] else torch.tensor(0.0)  # TRL skips the NLL forward when cpo_alpha is 0
    attributes = {"beta": 0.3, "simpo_gamma": 0.7, **case}
    their_loss, their_metrics = run_trl(CPOTrainer, "cpo_loss", chosen, rejected, trl_nll, **attributes)
    ours = cpo_loss(chosen, rejected, nll if case["cpo_alpha"] else None, **attributes)

    torch.testing.assert_close(ours.loss, their_loss, rtol=0, atol=ATOL)
    metrics = preference_metrics(ours.chosen_rewards, ours.rejected_rewards, chosen, rejected)
    assert_metrics_match(metrics, their_metrics)
    (their_grad,) = torch.autograd.grad(their_loss, chosen)
    (our_grad,) = torch.autograd.grad(ours.loss, chosen)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=ATOL)


def test_cpo_by_hand():
    chosen, rejected = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    nll = torch.tensor(0.5, dtype=torch.float64)
    assert cpo_loss(chosen, rejected, nll, beta=1.0).loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.5)
    simpo = cpo_loss(chosen, rejected, beta=2.0, loss_type="simpo", simpo_gamma=2.0, cpo_alpha=0.0).loss
    assert simpo.item() == pytest.approx(math.log(2))  # β·(1 − γ/β) = 0
    assert cpo_loss(chosen, rejected, nll, beta=2.0, loss_type="hinge", cpo_alpha=0.0).loss.item() == 0.0


def test_alphapo_reward_stays_finite_where_trl_overflows():
    logps = torch.tensor([-200.0, -1.0])
    torch.testing.assert_close(alphapo_reward(logps, 0.0), logps)
    reward = alphapo_reward(logps, 0.5)
    expected = torch.tensor([(1 - math.exp(100.0)) / 0.5, (1 - math.exp(0.5)) / 0.5])
    torch.testing.assert_close(reward, expected)
    # TRL's (1 − exp(ℓ).pow(−α))/α: exp(−200) underflows to 0 in float32, so the reward is −inf
    assert torch.isinf((1 - torch.exp(logps).pow(-0.5)) / 0.5)[0]


def test_cpo_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="Valid loss types: sigmoid, hinge, ipo, simpo"):
        cpo_loss(x, x, x, loss_type="kto_pair")
    with pytest.raises(ValueError, match="loss_type='simpo', cpo_alpha=0.0"):
        cpo_loss(x, x, x, loss_type="alphapo")
    with pytest.raises(ValueError, match="`nll_loss` is required"):
        cpo_loss(x, x)

"""DPO-family losses against TRL 1.16's own `DPOTrainer._compute_loss`.

TRL computes the loss inside `_compute_loss`, so the reference runs that very method on a stand-in trainer whose model
returns fixed per-token log-probs (what the fused LM head would return), then reads TRL's loss, gradient and logged
metrics back.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llm_trainer.losses import (
    DPO_LOSS_TYPES,
    check_dpo_options,
    dpo_loss,
    dpo_sequence_logps,
    f_divergence_scores,
    masked_mean_nll,
    preference_metrics,
    wpo_weights,
)

B, T = 5, 12
ATOL = 1e-6


def make_batch(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A [chosen; rejected] batch of 2B rows: per-token log-probs (zero off the completion, like the fused head),
    the reference's, log Σp² for WPO and the unshifted completion mask."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        length = int(torch.randint(1, T - prompt + 1, (1,), generator=gen))
        completion_mask[row, prompt : prompt + length] = 1
    shift_mask = completion_mask[:, 1:]

    def per_token(scale: float) -> torch.Tensor:
        return (-scale * torch.rand(2 * B, T - 1, generator=gen, dtype=dtype)) * shift_mask

    policy = per_token(2.0)
    return {
        "completion_mask": completion_mask,
        "shift_mask": shift_mask,
        "policy": policy,
        "ref": (policy.detach() + 0.3 * torch.randn(2 * B, T - 1, generator=gen, dtype=dtype)) * shift_mask,
        "log_sum_sq": per_token(1.0) - 0.5,
    }


class _FakeLM(torch.nn.Module):
    """Returns preset per-token outputs, as TRL's fused LM head would."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, **kwargs):
        shape = self.log_probs.shape
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=torch.zeros(shape, dtype=self.log_probs.dtype),
            mean_logits=torch.zeros(shape, dtype=self.log_probs.dtype),
            is_top1=torch.zeros(shape, dtype=torch.bool),
            log_sum_sq_probs=self.log_sum_sq,
        )


def trl_dpo(batch: dict, policy: torch.Tensor, **options) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics from TRL 1.16's `DPOTrainer._compute_loss` on this batch."""
    from trl.trainer.dpo_trainer import DPOTrainer

    config = {
        "beta": 0.1,
        "loss_types": ["sigmoid"],
        "loss_weights": None,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "ld_alpha": None,
        "use_weighting": False,
    }
    config.update(options)
    config["loss_weights"] = config["loss_weights"] or [1.0] * len(config["loss_types"])
    discopop_tau = config.pop("discopop_tau", 0.05)
    model = _FakeLM(policy, batch["log_sum_sq"])
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model,
        ref_model=_FakeLM(batch["ref"]),
        accelerator=accelerator,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **config,
    )
    mask = batch["completion_mask"]
    inputs = {"input_ids": mask.clone(), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def ours_dpo(batch: dict, policy: torch.Tensor, *, ld_alpha=None, use_weighting=False, **options):
    mask = batch["shift_mask"]
    chosen_logps, rejected_logps = dpo_sequence_logps(policy, mask, ld_alpha).chunk(2)
    ref_chosen_logps, ref_rejected_logps = dpo_sequence_logps(batch["ref"], mask, ld_alpha).chunk(2)
    chosen_lengths, rejected_lengths = batch["completion_mask"].sum(dim=1).chunk(2)
    output = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=masked_mean_nll(policy[:B], mask[:B]),
        pair_weights=wpo_weights(policy, batch["log_sum_sq"], mask) if use_weighting else None,
        **options,
    )
    metrics = preference_metrics(output.chosen_rewards, output.rejected_rewards, chosen_logps, rejected_logps)
    return output, metrics


def assert_matches_trl(seed: int, dtype: torch.dtype = torch.float64, *, check_grad: bool = True, **options) -> None:
    batch = make_batch(seed, dtype)
    trl_options = dict(options)
    if "loss_type" in trl_options:
        loss_type = trl_options.pop("loss_type")
        trl_options["loss_types"] = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    theirs_policy = batch["policy"].clone().requires_grad_(check_grad)
    ours_policy = batch["policy"].clone().requires_grad_(check_grad)
    their_loss, their_metrics = trl_dpo(batch, theirs_policy, **trl_options)
    ours, our_metrics = ours_dpo(batch, ours_policy, **options)

    assert ours.loss.dtype == their_loss.dtype
    torch.testing.assert_close(ours.loss, their_loss, rtol=0, atol=ATOL)
    for key, value in our_metrics.items():
        assert value == pytest.approx(their_metrics[key], abs=ATOL), key
    if check_grad:
        (their_grad,) = torch.autograd.grad(their_loss, theirs_policy)
        (our_grad,) = torch.autograd.grad(ours.loss, ours_policy)
        # Off the completion the fused head's output is a constant 0, so only completion tokens carry a gradient
        mask = batch["shift_mask"].bool()
        torch.testing.assert_close(our_grad[mask], their_grad[mask], rtol=0, atol=ATOL)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_loss_type_matches_trl(loss_type):
    label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.1
    assert_matches_trl(0, loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm", "hinge"])
@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence"])
def test_f_divergences_match_trl(loss_type, f_divergence_type):
    assert_matches_trl(1, loss_type=loss_type, f_divergence_type=f_divergence_type, beta=0.5, label_smoothing=0.05)


@pytest.mark.parametrize("coef", [0.5, -0.7, 1.0, 1.0 + 1e-8, 3.0])
def test_alpha_divergence_matches_trl_in_float32(coef):
    # TRL's α-divergence only knows the fp16/bf16/fp32 clamp bounds, so the comparison runs in float32.
    assert_matches_trl(
        2, torch.float32, loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef
    )


def test_alpha_divergence_formula_and_clamp():
    u = torch.tensor([-1.0, 0.0, 0.4, 400.0], dtype=torch.float64)
    expected = (torch.exp(-0.5 * u[:3]) - 1) / -0.5
    torch.testing.assert_close(f_divergence_scores(u, "alpha_divergence", 0.5)[:3], expected)
    # (α − 1)·u = 200 is clamped to 80 so the score stays finite
    big = f_divergence_scores(u, "alpha_divergence", 2.0)[3]
    assert big.item() == pytest.approx(math.expm1(80.0))
    half = torch.tensor([30.0], dtype=torch.float16)
    assert torch.isfinite(f_divergence_scores(half, "alpha_divergence", 2.0)).all()


def test_js_and_forward_kl_at_identity():
    zero = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(f_divergence_scores(zero, "js_divergence"), zero)
    torch.testing.assert_close(f_divergence_scores(zero, "forward_kl"), zero)


def test_combined_losses_with_weights_match_trl():
    assert_matches_trl(3, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_alpha_matches_trl(ld_alpha):
    assert_matches_trl(4, loss_type=["sigmoid", "ipo"], ld_alpha=ld_alpha)


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "bco_pair", "apo_zero", "discopop"]
)
def test_wpo_weighting_matches_trl(loss_type):
    # TRL scales the per-pair loss in place, which breaks its backward pass for `hinge` (relu saves its output), so
    # only the forward value can be compared there.
    assert_matches_trl(
        5, loss_type=loss_type, use_weighting=True, label_smoothing=0.01, check_grad=loss_type != "hinge"
    )


def test_wpo_weighting_of_sft_loss():
    # TRL's in-place scaling of the expanded scalar fails outright for `sft`; ours is the intended mean(w)·NLL.
    batch = make_batch(6)
    weighted, _ = ours_dpo(batch, batch["policy"], loss_type="sft", use_weighting=True)
    plain, _ = ours_dpo(batch, batch["policy"], loss_type="sft")
    weights = wpo_weights(batch["policy"], batch["log_sum_sq"], batch["shift_mask"])
    torch.testing.assert_close(weighted.loss, plain.loss * weights.mean())
    assert plain.loss.item() == pytest.approx(-batch["policy"][:B][batch["shift_mask"][:B].bool()].mean().item())


def test_wpo_weights_by_hand():
    per_token = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    log_sum_sq = torch.tensor([[-0.5, -1.0, 7.0], [-1.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = math.exp((-0.5 - 2.0) / 2) * math.exp(-1.0)
    assert wpo_weights(per_token, log_sum_sq, mask).item() == pytest.approx(expected)


def test_ld_sequence_logps_by_hand():
    # chosen has 3 completion tokens, rejected 1: only the chosen tail beyond the shared length 1 is scaled
    per_token = torch.tensor([[0.0, -1.0, -2.0, -4.0], [0.0, -8.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    torch.testing.assert_close(
        dpo_sequence_logps(per_token, mask, 0.5), torch.tensor([-1.0 - 0.5 * 6.0, -8.0], dtype=torch.float64)
    )
    torch.testing.assert_close(dpo_sequence_logps(per_token, mask), torch.tensor([-7.0, -8.0], dtype=torch.float64))


def test_sigmoid_with_no_preference_is_log_two():
    logps = torch.tensor([-3.0, -5.0], dtype=torch.float64)
    out = dpo_loss(logps, logps - 1.0, logps + 2.0, logps + 1.0)  # both log-ratios −2: Δ = 0
    assert out.loss.item() == pytest.approx(math.log(2))
    torch.testing.assert_close(out.chosen_rewards, torch.full((2,), -0.2, dtype=torch.float64))


def test_hand_computed_values():
    c = torch.tensor([1.0], dtype=torch.float64)  # chosen log-ratio 1, rejected log-ratio −1, Δ = 2
    zero = torch.zeros(1, dtype=torch.float64)
    pair = (c, -c, zero, zero)
    beta = 0.5
    assert dpo_loss(*pair, beta=beta, loss_type="hinge").loss.item() == pytest.approx(0.0)
    assert dpo_loss(*pair, beta=beta, loss_type="sigmoid").loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    lengths = torch.tensor([2.0])
    ipo = dpo_loss(*pair, beta=beta, loss_type="ipo", chosen_lengths=lengths, rejected_lengths=lengths).loss
    assert ipo.item() == pytest.approx((1.0 - 1.0) ** 2)  # Δ/len = 1 = 1/(2β)
    sppo = dpo_loss(*pair, beta=beta, loss_type="sppo_hard").loss
    assert sppo.item() == pytest.approx(0.0)  # c = 1/(2β), r = −1/(2β)


def test_sigmoid_gradient_is_minus_beta_sigma_of_minus_logits():
    chosen = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    dpo_loss(chosen, zero, zero, zero, beta=2.0).loss.backward()
    torch.testing.assert_close(chosen.grad, -2.0 * torch.sigmoid(-2.0 * chosen.detach()) / 2)


def test_rewards_are_detached_and_metrics_by_hand():
    chosen, rejected = torch.tensor([1.0, 2.0, 0.5], requires_grad=True), torch.tensor([1.5, 0.0, 0.5])
    out = dpo_loss(chosen, rejected, torch.zeros(3), torch.zeros(3), beta=2.0)
    assert not out.chosen_rewards.requires_grad and out.loss.requires_grad
    metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": 7.0 / 3,
            "rewards/rejected": 4.0 / 3,
            "rewards/accuracies": 1.0 / 3,  # a tie is not a win
            "rewards/margins": 1.0,
            "logps/chosen": 3.5 / 3,
            "logps/rejected": 2.0 / 3,
        }
    )


def test_metrics_use_gather():
    doubled = preference_metrics(
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        gather=lambda t: torch.cat([t.reshape(-1), torch.zeros(1)]),
    )
    assert doubled["rewards/chosen"] == 0.5 and doubled["rewards/accuracies"] == 0.5


def test_unknown_loss_type_lists_valid_ones():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="Valid loss types: sigmoid, hinge, ipo.*sigmoid_norm") as info:
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "kto_pair"])
    assert "kto_pair" in str(info.value)


def test_loss_weights_of_wrong_length_name_the_fix():
    with pytest.raises(ValueError, match="one weight per loss type.*loss_weights=None"):
        check_dpo_options(["sigmoid", "sft"], [1.0])


def test_option_errors():
    with pytest.raises(ValueError, match="only supported for the loss types"):
        check_dpo_options("bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="Unknown f_divergence_type"):
        check_dpo_options("sigmoid", f_divergence_type="kl")
    with pytest.raises(ValueError, match="exo_pair.*label_smoothing"):
        check_dpo_options("exo_pair")
    with pytest.raises(NotImplementedError, match="aot"):
        check_dpo_options(["sigmoid", "aot"], use_weighting=True)
    with pytest.warns(UserWarning, match=r"\[0.0, 0.5\)"):
        check_dpo_options("robust", label_smoothing=0.5)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(x, x, x, x, loss_type="sft")

"""GRPO and RLOO loss maths against TRL 1.16's own trainer methods.

The references run TRL's real `GRPOTrainer._compute_loss`, `GRPOTrainer._generate_and_score_completions`,
`RLOOTrainer._compute_loss` and `RLOOTrainer._generate_and_score_completions` on stand-in trainers: the model returns
fixed per-token log-probs, generation returns fixed token lists, the reward functions fixed rewards, and the
accelerator is one process (gather and reduce are the identity). Losses, gradients, advantages and the metrics TRL
logs are then read back and compared with ours.
"""

from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from llm_trainer.losses import (
    GRPO_LOSS_TYPES,
    clip_metrics,
    entropy_bonus,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    masked_sum_count,
    nanmax,
    nanmin,
    nanstd,
    off_policy_mask,
    reduce_metrics,
    rloo_advantages,
    rloo_loss,
    rloo_rewards,
    rloo_sequence_kl,
    vllm_importance_sampling_ratio,
    zero_std_groups,
)

ATOL = 1e-6
B, T = 6, 9
LENGTHS = [9, 4, 7, 1, 0, 6]  # completion lengths; one empty row, as a masked-out truncated completion


def make_batch(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Per-token log-probs (zero off the mask, as the fused head returns them) for the policy, the sampling policy,
    the reference and vLLM, plus entropies, advantages and two vLLM importance-sampling ratios."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)).long()

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(B, T, generator=gen, dtype=dtype)

    policy = -2.0 * torch.rand(B, T, generator=gen, dtype=dtype) * mask
    sampling = (policy + noise(0.3)) * mask
    sampling[0, 2] = sampling[1, 1] = float("nan")  # tokens vLLM could not score
    return {
        "mask": mask,
        "policy": policy,
        # Token noise plus a per-sequence drift, so that ratios leave [1 − ε, 1 + ε] at both levels
        "old": (policy + noise(0.3) + torch.tensor([[-0.35], [0.3], [0.0], [0.0], [0.0], [0.1]], dtype=dtype)) * mask,
        "ref": (policy + noise(0.3)) * mask,
        "sampling": sampling,
        "entropies": 3.0 * torch.rand(B, T, generator=gen, dtype=dtype),
        "advantages": torch.tensor([1.2, -0.7, 0.0, -1.5, 0.4, -0.9], dtype=dtype),
        "is_token": 0.5 + torch.rand(B, T, generator=gen, dtype=dtype),
        "is_sequence": 0.5 + torch.rand(B, 1, generator=gen, dtype=dtype),
    }


# ------------------------------------------------------------------------------------------------- GRPO loss


def identity_accelerator(**extra) -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        process_index=0,
        sync_gradients=True,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        reduce=lambda t, reduction="sum": t,
        pad_across_processes=lambda t, dim=0, pad_index=0: t,
        **extra,
    )


def trl_grpo_loss(batch: dict, policy: torch.Tensor, options: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and logged metrics from TRL 1.16's `GRPOTrainer._compute_loss` on this batch."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    mask, train = batch["mask"], not options["eval"]
    args = SimpleNamespace(
        use_bias_correction_kl=options["use_bias_correction_kl"],
        delta=options["delta"],
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=options["steps_per_generation"],
    )
    trainer = SimpleNamespace(
        args=args,
        model=SimpleNamespace(training=train),
        accelerator=identity_accelerator(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, batch["entropies"], None),
        aux_loss_enabled=False,
        top_entropy_quantile=options["top_entropy_quantile"],
        off_policy_mask_threshold=options["off_policy_mask_threshold"],
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        importance_sampling_level=options["importance_sampling_level"],
        beta=options["beta"],
        loss_type=options["loss_type"],
        epsilon_low=0.2,
        epsilon_high=options["epsilon_high"],
        use_vllm=options["is_ratio"] is not None,
        vllm_importance_sampling_correction=True,
        current_gradient_accumulation_steps=options["gas"],
        max_completion_length=T,
        # With a zero static coefficient the bonus changes nothing but makes TRL log `policy_loss`.
        _entropy_bonus_enabled=True,
        entropy_coef=options["entropy_coef"],
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": batch["advantages"],
        "ref_per_token_logps": batch["ref"],
        "num_items_in_batch": options["num_items_in_batch"],
    }
    if options["old"]:
        inputs["old_per_token_logps"] = batch["old"]
    if options["sampling"]:
        inputs["sampling_per_token_logps"] = batch["sampling"]
    if options["is_ratio"] is not None:
        inputs["importance_sampling_ratio"] = batch[options["is_ratio"]]
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    mode = "train" if train else "eval"
    return loss, {key: values[-1] for key, values in trainer._metrics[mode].items()}


def ours_grpo_loss(batch: dict, policy: torch.Tensor, options: dict):
    mask, train = batch["mask"], not options["eval"]
    quantile = options["top_entropy_quantile"]
    entropy_mask = high_entropy_mask(batch["entropies"], mask, 1 - quantile) if quantile < 1.0 else None
    accumulation = options["gas"] if train else 1.0
    normalizer = options["num_items_in_batch"].clamp(min=1.0)
    if train:
        normalizer = normalizer * options["gas"] / options["steps_per_generation"]
    out = grpo_loss(
        policy,
        batch["old"] if options["old"] else None,
        batch["advantages"],
        mask,
        loss_type=options["loss_type"],
        epsilon_high=options["epsilon_high"],
        delta=options["delta"],
        importance_sampling_level=options["importance_sampling_level"],
        beta=options["beta"],
        ref_per_token_logps=batch["ref"],
        use_bias_correction_kl=options["use_bias_correction_kl"],
        importance_sampling_ratio=None if options["is_ratio"] is None else batch[options["is_ratio"]],
        off_policy_mask_threshold=options["off_policy_mask_threshold"],
        sampling_per_token_logps=batch["sampling"] if options["sampling"] else None,
        entropy_mask=entropy_mask,
        max_completion_length=T,
        accumulation_steps=accumulation,
        token_normalizer=normalizer,
    )
    loss = out.loss - options["entropy_coef"] * entropy_bonus(batch["entropies"], mask, entropy_mask, accumulation)
    local = clip_metrics(out.coef_1, batch["advantages"], mask, 0.2, options["epsilon_high"], options["loss_type"])
    local["entropy"] = masked_sum_count(batch["entropies"], mask)
    if out.per_token_kl is not None:
        local["kl"] = masked_sum_count(out.per_token_kl, mask)
    if out.phi_seq is not None:
        local["vespo/phi_seq_mean"] = masked_sum_count(out.phi_seq, mask)
    metrics = reduce_metrics(local)
    metrics["policy_loss"] = out.policy_loss.item()
    return loss, metrics, out


GRPO_OPTIONS = {
    "plain": {},
    "on_policy": {"old": False},
    "delta": {"delta": 1.1},
    "entropy_mask": {"top_entropy_quantile": 0.4},
    "off_policy_mask": {"off_policy_mask_threshold": 0.02},
    "off_policy_mask_vllm": {"off_policy_mask_threshold": 0.02, "sampling": True},
    "vllm_token_is": {"is_ratio": "is_token"},
    "vllm_sequence_is": {"is_ratio": "is_sequence"},
    "grad_accumulation_2": {"gas": 2, "steps_per_generation": 4},
    "eval": {"eval": True, "gas": 2},
    "no_kl_bias_correction": {"use_bias_correction_kl": False},
}


def grpo_options(loss_type: str, level: str, beta: float, option: str) -> dict:
    options = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "beta": beta,
        "epsilon_high": 3.0 if loss_type == "cispo" else 0.28,
        "delta": None,
        "use_bias_correction_kl": True,
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "sampling": False,
        "is_ratio": None,
        "old": True,
        "eval": False,
        "gas": 1,
        "steps_per_generation": 1,
        "entropy_coef": 0.0,
        "num_items_in_batch": torch.tensor(3 * sum(LENGTHS)),  # the generation batch spans several micro-batches
    }
    options.update(GRPO_OPTIONS[option])
    return options


def assert_grpo_matches_trl(options: dict, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
    batch = make_batch(seed, dtype)
    theirs_policy = batch["policy"].clone().requires_grad_()
    ours_policy = batch["policy"].clone().requires_grad_()
    their_loss, their_metrics = trl_grpo_loss(batch, theirs_policy, options)
    our_loss, our_metrics, _ = ours_grpo_loss(batch, ours_policy, options)

    assert our_loss.dtype == their_loss.dtype
    torch.testing.assert_close(our_loss, their_loss, rtol=0, atol=ATOL)
    (their_grad,) = torch.autograd.grad(their_loss, theirs_policy)
    (our_grad,) = torch.autograd.grad(our_loss, ours_policy)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=ATOL)
    their_metrics.pop("entropy_coef", None)  # logged in training only
    assert set(our_metrics) == set(their_metrics)
    for key, value in their_metrics.items():
        assert our_metrics[key] == pytest.approx(value, abs=ATOL, nan_ok=True), key


@pytest.mark.parametrize("option", list(GRPO_OPTIONS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_matches_trl(loss_type, level, beta, option):
    assert_grpo_matches_trl(grpo_options(loss_type, level, beta, option))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_grpo_loss_matches_trl_in_float32_with_everything_on(loss_type):
    options = grpo_options(loss_type, "token", 0.04, "grad_accumulation_2")
    options.update(top_entropy_quantile=0.5, off_policy_mask_threshold=0.02, sampling=True, is_ratio="is_token")
    assert_grpo_matches_trl(options, seed=1, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("quantile", [1.0, 0.3])
def test_entropy_bonus_matches_trl(mode, quantile):
    options = grpo_options("bnpo", "token", 0.0, "eval" if mode == "eval" else "grad_accumulation_2")
    options.update(entropy_coef=0.05, top_entropy_quantile=quantile)
    assert_grpo_matches_trl(options, seed=2)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_clipped_loss_types_clip_and_metrics_see_it(level):
    # The batch must exercise what the comparisons check: ratios outside [1 − ε, 1 + ε] on both sides.
    batch = make_batch(0)
    _, metrics, out = ours_grpo_loss(batch, batch["policy"], grpo_options("dapo", level, 0.0, "plain"))
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert metrics["clip_ratio/region_mean"] == pytest.approx(
        metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"]
    )
    assert metrics["clip_ratio/low_min"] == 0.0 and 0.0 < metrics["clip_ratio/high_max"] <= 1.0
    assert out.coef_1.shape == ((B, T) if level == "token" else (B, 1))
    assert out.per_token_kl is None and out.phi_seq is None


def test_grpo_loss_on_policy_value_and_gradient():
    # On-policy, r ≡ 1: the clipped loss is −A per token, and its gradient is −A·m/len per token for `grpo`.
    batch = make_batch(3)
    policy = batch["policy"].clone().requires_grad_()
    mask, advantages = batch["mask"], batch["advantages"]
    out = grpo_loss(policy, None, advantages, mask, loss_type="grpo", accumulation_steps=2.0)
    lengths = mask.sum(-1).clamp(min=1)
    expected = (-advantages * (mask.sum(-1) > 0)).mean()
    torch.testing.assert_close(out.policy_loss, expected)
    torch.testing.assert_close(out.loss, expected / 2)
    out.loss.backward()
    torch.testing.assert_close(policy.grad, -(advantages / lengths).unsqueeze(1) * mask / B / 2)


def test_dapo_default_token_normalizer_is_the_local_token_count():
    batch = make_batch(4)
    mask = batch["mask"]
    default = grpo_loss(batch["policy"], batch["old"], batch["advantages"], mask, accumulation_steps=2)
    explicit = grpo_loss(
        batch["policy"], batch["old"], batch["advantages"], mask, token_normalizer=2 * mask.sum().float()
    )
    torch.testing.assert_close(default.loss, explicit.loss)
    torch.testing.assert_close(default.policy_loss, default.loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
        ({"beta": 0.1}, "ref_per_token_logps"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
    ],
)
def test_grpo_loss_rejects_bad_options(kwargs, message):
    batch = make_batch(0)
    with pytest.raises(ValueError, match=message):
        grpo_loss(batch["policy"], batch["old"], batch["advantages"], batch["mask"], **kwargs)


def test_grpo_loss_rejects_mismatched_shapes():
    batch = make_batch(0)
    with pytest.raises(ValueError, match=r"must both be \(B, T\)"):
        grpo_loss(batch["policy"], batch["old"], batch["advantages"], batch["mask"][:, :-1])


# ---------------------------------------------------------------------------------------------- masks, weights


def test_high_entropy_mask_matches_trl_and_selects_top_tokens():
    from trl.trainer.grpo_trainer import GRPOTrainer

    stub = SimpleNamespace(accelerator=identity_accelerator())
    for dtype in (torch.float64, torch.float32):  # in fp32, the extreme quantiles are exactly a token's entropy
        batch = make_batch(5, dtype)
        entropies, mask = batch["entropies"], batch["mask"]
        for threshold in (0.0, 0.25, 0.8, 1.0):
            theirs = GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, threshold)
            ours = high_entropy_mask(entropies, mask, threshold)
            assert torch.equal(ours, theirs)
            assert not ours[mask == 0].any()
        assert high_entropy_mask(entropies, mask, 0.0).sum() == mask.sum()
    kept = entropies[mask.bool()]
    top = high_entropy_mask(entropies, mask, 0.75)
    assert top.sum() == pytest.approx(0.25 * kept.numel(), abs=1)
    assert entropies[top].min() >= kept.quantile(0.75).float()
    assert not high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


def test_high_entropy_mask_uses_the_gathered_entropies():
    batch = make_batch(5)
    entropies, mask = batch["entropies"], batch["mask"]
    others = torch.full((200,), 100.0)  # another process whose entropies are all higher
    selected = high_entropy_mask(entropies, mask, 0.5, gather=lambda local: torch.cat([local, others]))
    assert not selected.any()
    with pytest.raises(ValueError, match="quantile_threshold"):
        high_entropy_mask(entropies, mask, 1.5)


def test_off_policy_mask_matches_trl():
    from trl.trainer.grpo_trainer import GRPOTrainer

    batch = make_batch(6)
    advantages = batch["advantages"].unsqueeze(1)
    for threshold in (0.0, 0.05, 10.0):
        args = (advantages, batch["policy"], batch["sampling"], batch["mask"], threshold)
        theirs = GRPOTrainer.get_off_policy_mask(*args)
        ours = off_policy_mask(*args)
        assert ours.shape == (B, 1) and ours.dtype == batch["mask"].dtype
        assert torch.equal(ours, theirs)
        assert ours[advantages >= 0].all()
    assert not off_policy_mask(advantages, batch["policy"], batch["policy"] + 1, batch["mask"], 0.5)[1]


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize(("clip_min", "clip_max"), [(None, 3.0), (0.5, 1.5), (0.9, None)])
def test_vllm_importance_sampling_ratio_matches_trl(mode, clip_min, clip_max):
    batch = make_batch(7)
    sampling = batch["sampling"].clone()
    sampling[2] -= 0.4  # a sequence far from the policy, so clipping bites
    theirs, harness = trl_generate_and_score(
        rewards_per_func=torch.ones(B, 1),
        num_generations=2,
        old=batch["old"],
        sampling=sampling,
        vllm_mode=mode,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    ours = vllm_importance_sampling_ratio(batch["old"], sampling, batch["mask"], mode, clip_min, clip_max)
    torch.testing.assert_close(ours, theirs["importance_sampling_ratio"], rtol=0, atol=ATOL)
    assert ours.shape == ((B, T) if mode.startswith("token") else (B, 1))
    assert torch.isfinite(ours).all()


def test_vllm_importance_sampling_ratio_rejects_bad_options():
    batch = make_batch(7)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        vllm_importance_sampling_ratio(batch["old"], batch["sampling"], batch["mask"], "token")
    with pytest.raises(ValueError, match="clip_min or clip_max"):
        vllm_importance_sampling_ratio(batch["old"], batch["sampling"], batch["mask"], "token_truncate", None, None)


def test_vespo_gamma_weights_peak_at_one_and_carry_no_gradient():
    from llm_trainer.losses import vespo_gamma_weights

    mask = torch.ones(2, 3)
    log_ratio = torch.zeros(2, 3, requires_grad=True)
    phi = vespo_gamma_weights(torch.tensor([[1.0], [-1.0]]), log_ratio, mask)
    torch.testing.assert_close(phi, torch.ones(2, 1))
    assert not phi.requires_grad
    far = vespo_gamma_weights(torch.tensor([[1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3))
    assert 0 < far.item() < 1


# ------------------------------------------------------------------------------------------- GRPO advantages


def trl_generate_and_score(
    rewards_per_func: torch.Tensor,
    num_generations: int,
    *,
    reward_weights: torch.Tensor | None = None,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
    train: bool = True,
    old: torch.Tensor | None = None,
    sampling: torch.Tensor | None = None,
    vllm_mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[dict, SimpleNamespace]:
    """TRL 1.16's `GRPOTrainer._generate_and_score_completions` with generation, the policy and the reward functions
    replaced by fixed outputs: completions of `LENGTHS[i % B]` tokens, `old` as the policy's log-probs and
    `sampling` as vLLM's (the vLLM correction is on when `sampling` is given)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    n, k = rewards_per_func.shape
    lengths = [LENGTHS[i % B] for i in range(n)]
    sampling_lists = None
    if sampling is not None:
        sampling_lists = [[None if torch.isnan(x) else x.item() for x in sampling[i, : lengths[i]]] for i in range(n)]

    def generate(prompts):
        completions = [[5] * length for length in lengths]
        return [[1, 2]] * n, completions, None, ["c"] * n, sampling_lists, {}, None, None

    args = SimpleNamespace(
        per_device_train_batch_size=n,
        per_device_eval_batch_size=n,
        gradient_checkpointing_kwargs=None,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
    )
    trainer = SimpleNamespace(
        args=args,
        model=SimpleNamespace(training=train, is_gradient_checkpointing=False),
        accelerator=identity_accelerator(),
        environment_factories=None,
        environments=None,
        tools=None,
        _generate=generate,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_iterations=1,
        use_vllm=sampling is not None,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=vllm_mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
        _get_per_token_logps_and_entropies=lambda *a, **kw: (old, None, None),
        beta=0.0,
        _calculate_rewards=lambda *a: rewards_per_func.clone(),
        num_generations=num_generations if train else 8,
        num_generations_eval=num_generations,
        multi_objective_aggregation=aggregation,
        reward_weights=torch.ones(k) if reward_weights is None else reward_weights,
        scale_rewards=scale_rewards,
        reward_funcs=[None] * k,
        reward_func_names=[f"f{i}" for i in range(k)],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    output = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": f"p{i}"} for i in range(n)])
    return output, trainer


NAN = float("nan")
REWARDS = {
    # 12 completions, 3 reward functions (one only applies to some rows), groups of 4
    "dense": torch.tensor(
        [[1.0, 0.5, 0.2], [0.0, 0.1, 0.9], [1.0, 0.3, 0.3], [0.0, 0.2, 0.1]]
        + [[1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [1.0, 0.0, 0.5]]  # a group with zero std
        + [[0.3, 0.7, 0.4], [0.8, 0.6, 0.0], [0.2, 0.9, 0.7], [0.5, 0.1, 0.6]]
    ),
    "nan": torch.tensor(
        [[1.0, NAN, 0.2], [0.0, 0.1, NAN], [NAN, NAN, NAN], [0.0, 0.2, 0.1]]  # one unscorable completion
        + [[NAN, NAN, NAN], [NAN, NAN, NAN], [NAN, NAN, NAN], [1.0, NAN, 0.5]]  # a group with one scorable
        + [[0.3, NAN, 0.4], [0.8, NAN, 0.0], [0.2, NAN, 0.7], [0.5, NAN, 0.6]]  # a function that never applies
    ),
}
WEIGHTS = torch.tensor([1.0, 0.5, 2.0])


@pytest.mark.parametrize("rewards", list(REWARDS))
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [4, 2, 1])
def test_group_advantages_match_trl(rewards, aggregation, scale_rewards, num_generations):
    rewards_per_func = REWARDS[rewards]
    # num_generations == 1 only happens in evaluation (num_generations_eval=1)
    output, trainer = trl_generate_and_score(
        rewards_per_func,
        num_generations,
        reward_weights=WEIGHTS,
        scale_rewards=scale_rewards,
        aggregation=aggregation,
        train=num_generations > 1,
    )
    advantages, summed, is_std_zero = group_advantages(
        rewards_per_func, WEIGHTS, num_generations, scale_rewards, aggregation
    )
    torch.testing.assert_close(advantages, output["advantages"], rtol=0, atol=ATOL)
    assert advantages.tolist() == pytest.approx(trainer._logs["advantages"], abs=ATOL)
    assert torch.isfinite(advantages).all()
    metrics = trainer._metrics["train" if num_generations > 1 else "eval"]
    assert torch.nanmean(summed).item() == pytest.approx(metrics["reward"][-1], abs=ATOL)
    assert nanstd(summed).item() == pytest.approx(metrics["reward_std"][-1], abs=ATOL)
    assert is_std_zero.float().mean().item() == pytest.approx(metrics["frac_reward_zero_std"][-1], abs=ATOL)


def test_group_advantages_semantics():
    rewards_per_func = REWARDS["nan"]
    advantages, summed, is_std_zero = group_advantages(rewards_per_func, WEIGHTS, 4)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    assert torch.isnan(summed[unscorable]).all() and not torch.isnan(summed[~unscorable]).any()
    assert (advantages[unscorable] == 0).all()
    assert advantages[7] == 0  # alone in its group: no baseline to compare with
    for group in advantages.view(-1, 4):
        assert group.sum().abs() < 1e-5
    dense = group_advantages(REWARDS["dense"], WEIGHTS, 4)
    assert dense[2].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert (dense[0][4:8] == 0).all()


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(REWARDS["dense"], WEIGHTS, 5)
    with pytest.raises(ValueError, match="reward_weights"):
        group_advantages(REWARDS["dense"], WEIGHTS[:2], 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS["dense"], WEIGHTS, 4, scale_rewards="std")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        group_advantages(REWARDS["dense"], WEIGHTS, 4, aggregation="sum")


def test_nan_statistics_match_trl():
    from trl.trainer import utils

    values = torch.tensor([[1.0, NAN, 3.0, 4.0], [NAN, NAN, 2.0, NAN], [NAN] * 4])
    torch.testing.assert_close(nanstd(values, dim=1), utils.nanstd(values, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(values), utils.nanstd(values))
    torch.testing.assert_close(
        nanstd(values, dim=0, keepdim=True), utils.nanstd(values, dim=0, keepdim=True), equal_nan=True
    )
    for row in values:
        torch.testing.assert_close(nanmin(row), utils.nanmin(row), equal_nan=True)
        torch.testing.assert_close(nanmax(row), utils.nanmax(row), equal_nan=True)


# --------------------------------------------------------------------------------------------------------- RLOO


def trl_rloo_score(
    rewards_per_func: torch.Tensor,
    num_generations: int,
    old: torch.Tensor,
    ref: torch.Tensor,
    *,
    beta: float,
    normalize: bool,
    reward_clip_range: tuple[float, float] | None,
    train: bool = True,
) -> tuple[dict, SimpleNamespace]:
    """TRL 1.16's `RLOOTrainer._generate_and_score_completions` with fixed generations, log-probs and rewards."""
    from trl.trainer.rloo_trainer import RLOOTrainer

    n, k = rewards_per_func.shape
    lengths = [LENGTHS[i % B] for i in range(n)]
    policy_model, ref_model = SimpleNamespace(training=train, is_gradient_checkpointing=False), object()

    def logps(model, *args, **kwargs):
        return (ref if model is ref_model else old), None, None

    trainer = SimpleNamespace(
        args=SimpleNamespace(
            per_device_train_batch_size=n, per_device_eval_batch_size=n, gradient_checkpointing_kwargs=None
        ),
        model=policy_model,
        ref_model=ref_model,
        accelerator=identity_accelerator(),
        _generate=lambda prompts: ([[1, 2]] * n, [[5] * length for length in lengths], ["c"] * n),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        _get_per_token_logps_and_entropies=logps,
        beta=beta,
        _calculate_rewards=lambda *a: rewards_per_func.clone(),
        num_generations=num_generations if train else 8,
        num_generations_eval=num_generations,
        reward_weights=WEIGHTS,
        reward_clip_range=reward_clip_range,
        normalize_advantages=normalize,
        reward_funcs=[None] * k,
        reward_func_names=[f"f{i}" for i in range(k)],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    output = RLOOTrainer._generate_and_score_completions(trainer, [{"prompt": f"p{i}"} for i in range(n)])
    return output, trainer


@pytest.mark.parametrize("rewards", list(REWARDS))
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reward_clip_range", [None, (0.0, 1.5)])
@pytest.mark.parametrize("num_generations", [4, 1])
def test_rloo_advantages_and_kl_reward_match_trl(rewards, beta, normalize, reward_clip_range, num_generations):
    rewards_per_func = REWARDS[rewards]
    n = rewards_per_func.shape[0]
    batch, more = make_batch(8), make_batch(9)
    old, ref = torch.cat([batch["old"], more["old"]]), torch.cat([batch["ref"], more["ref"]])
    mask = torch.cat([batch["mask"], more["mask"]])
    assert old.shape[0] == n
    output, trainer = trl_rloo_score(
        rewards_per_func,
        num_generations,
        old,
        ref,
        beta=beta,
        normalize=normalize,
        reward_clip_range=reward_clip_range,
        train=num_generations > 1,
    )
    kl = rloo_sequence_kl(old, ref, mask)
    rewards = rloo_rewards(rewards_per_func, WEIGHTS, reward_clip_range=reward_clip_range, beta=beta, sequence_kl=kl)
    advantages = rloo_advantages(rewards, num_generations, normalize)
    torch.testing.assert_close(advantages, output["advantages"], rtol=0, atol=ATOL)
    assert torch.isfinite(advantages).all()
    metrics = trainer._metrics["train" if num_generations > 1 else "eval"]
    logged = rloo_rewards(rewards_per_func, WEIGHTS)
    assert torch.nanmean(logged).item() == pytest.approx(metrics["reward"][-1], abs=ATOL)
    assert nanstd(logged).item() == pytest.approx(metrics["reward_std"][-1], abs=ATOL)
    frac_zero_std = zero_std_groups(rewards, num_generations).float().mean().item()
    assert frac_zero_std == pytest.approx(metrics["frac_reward_zero_std"][-1], abs=ATOL)
    if beta:
        assert (kl.sum() / mask.sum()).item() == pytest.approx(metrics["kl"][-1], abs=ATOL)
    torch.testing.assert_close(output["old_logps"], (old * mask).sum(1))


def test_rloo_advantages_leave_one_out():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, NAN, 5.0, 1.0, 0.0])
    advantages = rloo_advantages(rewards, 4)
    torch.testing.assert_close(advantages[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    torch.testing.assert_close(advantages[4:], torch.tensor([0.0, 5 - 0.5, 1 - 2.5, 0 - 3.0]))
    assert (rloo_advantages(rewards, 1) == 0).all()
    with pytest.raises(ValueError, match="sequence_kl"):
        rloo_rewards(REWARDS["dense"], WEIGHTS, beta=0.05)
    with pytest.raises(ValueError, match="gather it"):
        rloo_rewards(REWARDS["dense"], WEIGHTS, beta=0.05, sequence_kl=torch.zeros(3))


def trl_rloo_loss(batch: dict, policy: torch.Tensor, old_logps: torch.Tensor, train: bool):
    from trl.trainer.rloo_trainer import RLOOTrainer

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=train),
        accelerator=identity_accelerator(),
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, batch["entropies"], None),
        aux_loss_enabled=False,
        epsilon_low=0.2,
        epsilon_high=0.28,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": batch["mask"],
        "old_logps": old_logps,
        "advantages": batch["advantages"],
    }
    loss = RLOOTrainer._compute_loss(trainer, trainer.model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train" if train else "eval"].items()}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_loss_matches_trl(seed, train):
    batch = make_batch(seed)
    mask = batch["mask"]
    # Sequence log-ratios of a few tenths, so that some ratios fall outside [0.8, 1.28]
    old_logps = (batch["policy"] * mask).sum(1) + 0.4 * torch.randn(
        B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    theirs_policy = batch["policy"].clone().requires_grad_()
    ours_policy = batch["policy"].clone().requires_grad_()
    their_loss, their_metrics = trl_rloo_loss(batch, theirs_policy, old_logps, train)
    our_loss, coef_1 = rloo_loss((ours_policy * mask).sum(1), old_logps, batch["advantages"], 0.2, 0.28)
    torch.testing.assert_close(our_loss, their_loss, rtol=0, atol=ATOL)
    (their_grad,) = torch.autograd.grad(their_loss, theirs_policy)
    (our_grad,) = torch.autograd.grad(our_loss, ours_policy)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=ATOL)

    local = clip_metrics(coef_1, batch["advantages"], None, 0.2, 0.28)
    local["entropy"] = masked_sum_count(batch["entropies"], mask)
    ours = reduce_metrics(local)
    assert set(ours) == set(their_metrics)
    for key, value in their_metrics.items():
        assert ours[key] == pytest.approx(value, abs=ATOL), key
    assert 0 < ours["clip_ratio/region_mean"] < 1


def test_clip_metrics_per_sequence_extremes_skip_empty_rows():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    coef_1 = torch.tensor([[0.5, 1.0, 1.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    metrics = reduce_metrics(clip_metrics(coef_1, -torch.ones(3), mask))
    assert metrics["clip_ratio/low_min"] == 0.5  # the empty row has no fraction, rather than 0
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 3)
    assert metrics["clip_ratio/high_max"] == 0.0


def test_reduce_metrics_across_processes():
    # Two processes: [sum, count] pairs are summed, per-sequence values concatenated.
    mine = {"clip_ratio/low_mean": torch.tensor([1.0, 4.0]), "clip_ratio/high_max": torch.tensor([0.5, NAN])}
    other = {"clip_ratio/low_mean": torch.tensor([3.0, 4.0]), "clip_ratio/high_max": torch.tensor([0.75])}
    out = reduce_metrics(
        mine,
        reduce_sum=lambda t: t + other["clip_ratio/low_mean"],
        gather=lambda t: torch.cat([t, other["clip_ratio/high_max"]]),
    )
    assert out == {"clip_ratio/low_mean": 0.5, "clip_ratio/high_max": 0.75}
    assert clip_metrics(torch.ones(2, 3), torch.ones(2), torch.ones(2, 3), loss_type="sapo") == {}

"""Run the same training through TRL and llm_trainer and compare what they log."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Keys that differ by nature between two runs (wall-clock) or that only the Trainer itself logs.
VOLATILE = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "step_time"}

# Float32 rounding. Two correct implementations that add the same numbers in another order (another CPU's SIMD width
# or BLAS kernel, another thread count, logits in chunks or all at once) differ by a few float32 eps *of the terms they
# add*, not of the result. For most metrics (log-probs, entropy, a loss of ~0.7) the two are alike and the relative
# tolerance covers it. A metric that is a difference of larger terms, and so can be near zero (a DPO/KTO reward
# β·(logp − ref_logp) of 6e-4 from |logp| ≈ 110, a margin, a KL estimate, a policy-gradient loss), keeps the absolute
# rounding of its terms, which relative to its own value can be anything: such a metric is also accepted within
# ROUNDING_SAFETY · FLOAT32_EPS · (the magnitude of its terms), see `rounding_scale`.
FLOAT32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps ≈ 1.19e-7
# The largest gap seen between llm_trainer and TRL on x86-64 was 1.2 eps of the scale (the reported KTO LoRA failure,
# rewards/rejected 0.0005867 vs 0.0005852 with scale β·|logp| = 11.1), over AVX-512, AVX2 and scalar ATen kernels,
# MKL's CBWR path and 1, 2 or 8 threads. A float32 sum of n terms rounds to ~√n eps of their size (sequences here are
# ≤ ~100 tokens: ≈ 10), and each step starts from weights carrying the previous steps' rounding: 32 keeps a > 20×
# margin over what was seen, while a wrong β (10% off), sign-flipped rewards or a KL term dropped from the KTO loss,
# injected into llm_trainer, still fail the parity tests by ≥ 4× their tolerance.
ROUNDING_SAFETY = 32


def _magnitude(entries: Sequence[Mapping[str, Any]], key: str) -> float:
    return max((abs(entry[key]) for entry in entries if isinstance(entry.get(key), (int, float))), default=0.0)


def rounding_scale(key: str, entries: Sequence[Mapping[str, Any]], beta: float | None = None) -> float | None:
    """The magnitude of the float32 terms that the logged metric `key` is a difference or mean of, read off the same
    step's log `entries` (ours and TRL's); None for a metric with no such cancellation (then only the relative
    tolerance applies). `eval_`-prefixed keys read the `eval_` entries.

    - `rewards/chosen|rejected` (DPO, KTO, BCO: β·(logp − ref_logp) per sequence; ORPO/CPO: β·logp): β·|logps/…|,
      `rewards/margins` and ORPO's `log_odds_chosen` (chosen − rejected): both sides' terms; BCO's `delta` (the
      running mean of those rewards): β·max |logps/…|;
    - `kl`: KTO's is a mean of logp − ref_logp over mismatched pairs, sequence sums like `logps/*`: max |logps/…|;
      GRPO's and RLOO's are per-token log-prob differences, each term ≈ a sampled token's −log p, i.e. `entropy`;
    - a reward model's `margin`, `mean_reward` (rewards of both signs) and `min_reward`/`max_reward` (single scores,
      which can be near 0): max |reward|;
    - `logits/chosen|rejected`, means of logits of both signs over vocabulary × tokens: an LM's logits are O(1)
      (the tiny test models' are well below 1), so 1.
    """
    prefix = "eval_" if key.startswith("eval_") else ""
    name = key.removeprefix(prefix)

    def mag(metric: str) -> float:
        return _magnitude(entries, prefix + metric)

    beta = 1.0 if beta is None else abs(beta)
    if name in ("rewards/chosen", "rewards/rejected"):
        return beta * mag(name.replace("rewards/", "logps/"))
    if name == "rewards/margins":
        return beta * (mag("logps/chosen") + mag("logps/rejected"))
    if name == "delta":
        return beta * max(mag("logps/chosen"), mag("logps/rejected"))
    if name == "log_odds_chosen":
        return mag("logps/chosen") + mag("logps/rejected")
    if name == "kl":
        if any(prefix + "logps/chosen" in entry or prefix + "logps/rejected" in entry for entry in entries):
            return max(mag("logps/chosen"), mag("logps/rejected"))
        return max(mag("entropy"), 1.0)
    if name in ("margin", "mean_reward", "min_reward", "max_reward"):
        return max(mag("min_reward"), mag("max_reward"))
    if name in ("logits/chosen", "logits/rejected"):
        return 1.0
    return None


def assert_close_metrics(
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any],
    keys: Sequence[str],
    *,
    rtol: float = 1e-3,
    loss_rtol: float = 1e-4,
    loss_scale: float | str | None = None,
    beta: float | None = None,
    where: str = "",
) -> None:
    """Each of `keys` in `ours` within `rtol` (`loss_rtol` for `loss`/`eval_loss`) of `theirs`, or within
    ROUNDING_SAFETY · FLOAT32_EPS · `rounding_scale(key, …, beta)` for metrics that can be near zero. `loss_scale` is
    that magnitude for a loss that hovers around 0 (and its `policy_loss`): the size of the per-token terms it
    averages, as a number or as the name of a logged metric that has it. None must match None."""
    for key in keys:
        a, b = ours[key], theirs[key]
        if a is None or b is None:
            assert a is b, f"{where}{key} {a} vs TRL {b}"
            continue
        name = key.removeprefix("eval_")
        if name in ("loss", "policy_loss"):
            scale = _magnitude((ours, theirs), loss_scale) if isinstance(loss_scale, str) else loss_scale
        else:
            scale = rounding_scale(key, (ours, theirs), beta)
        abs_tol = ROUNDING_SAFETY * FLOAT32_EPS * scale if scale else 0.0
        rel_tol = loss_rtol if name == "loss" else rtol
        assert math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol), (
            f"{where}{key} {a!r} vs TRL {b!r} (|diff| {abs(a - b):.3g}; tolerance: {rel_tol:g} relative, "
            f"{abs_tol:.3g} absolute)"
        )


def step_logs(trainer) -> list[dict[str, Any]]:
    """The per-step training logs (those with a `loss`), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_logs(
    our_steps: Sequence[Mapping[str, Any]],
    their_steps: Sequence[Mapping[str, Any]],
    *,
    skip: Sequence[str] = ("epoch", "learning_rate"),
    **tolerances: Any,
) -> None:
    """Same number of logged steps, the same metric names, and each metric close (`assert_close_metrics`)."""
    assert len(our_steps) == len(their_steps) > 0, (len(our_steps), len(their_steps))
    for step, (a, b) in enumerate(zip(our_steps, their_steps)):
        assert set(a) - VOLATILE == set(b) - VOLATILE, f"step {step}: metric names differ: {set(a) ^ set(b)}"
        keys = sorted(set(a) - VOLATILE - set(skip))
        assert_close_metrics(a, b, keys, where=f"step {step}: ", **tolerances)


def assert_same_training(
    ours, theirs, rtol: float = 1e-4, metric_rtol: float = 1e-3, loss_scale: float | str | None = None
) -> None:
    """Same number of logged steps, the same metric names, per-step `loss` within `rtol` (or, for a loss that hovers
    around 0, within the rounding of `loss_scale`) and metrics within `metric_rtol` (or, for those that can be near
    zero, within the rounding of the terms they are computed from: `rounding_scale`, with the trainer's β)."""
    assert_same_logs(
        step_logs(ours),
        step_logs(theirs),
        rtol=metric_rtol,
        loss_rtol=rtol,
        loss_scale=loss_scale,
        beta=getattr(ours.args, "beta", None),
    )

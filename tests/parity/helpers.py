"""Run the same training through TRL and llm_trainer and compare what they log."""

from __future__ import annotations

import math
from typing import Any

# Keys that differ by nature between two runs (wall-clock) or that only the Trainer itself logs.
VOLATILE = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "step_time"}


def step_logs(trainer) -> list[dict[str, Any]]:
    """The per-step training logs (those with a `loss`), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_training(
    ours, theirs, rtol: float = 1e-4, metric_rtol: float = 1e-3, atol: float = 1e-6, loss_atol: float = 0.0
) -> None:
    """Same number of logged steps, the same metric names, per-step `loss` within `rtol` (or `loss_atol`, for losses
    that hover around 0) and metrics within `metric_rtol` (relative) or `atol`."""
    our_steps, their_steps = step_logs(ours), step_logs(theirs)
    assert len(our_steps) == len(their_steps) > 0, (len(our_steps), len(their_steps))
    for step, (a, b) in enumerate(zip(our_steps, their_steps)):
        assert set(a) - VOLATILE == set(b) - VOLATILE, f"step {step}: metric names differ: {set(a) ^ set(b)}"
        assert math.isclose(a["loss"], b["loss"], rel_tol=rtol, abs_tol=loss_atol), (
            f"step {step}: loss {a['loss']} vs TRL {b['loss']}"
        )
        for key in sorted(set(a) - VOLATILE - {"loss", "epoch", "learning_rate"}):
            if a[key] is None or b[key] is None:
                assert a[key] is b[key], f"step {step}: {key} {a[key]} vs TRL {b[key]}"
                continue
            assert math.isclose(a[key], b[key], rel_tol=metric_rtol, abs_tol=atol), (
                f"step {step}: {key} {a[key]} vs TRL {b[key]}"
            )

"""SFT, DPO and GRPO across two processes (`torchrun`, gloo on CPU) match TRL 1.16 across two processes: batches
split over processes, gradients all-reduced, metrics gathered the same way (and for GRPO: prompt groups split, rewards
gathered, advantages sliced back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_trainer.trainer.utils import free_port

from .helpers import assert_same_logs

pytest.importorskip("trl")

SCRIPT = Path(__file__).with_name("distributed_run.py")


def _run(algorithm: str, package: str, model: str, out: Path) -> dict:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command = [*launcher, str(free_port()), str(SCRIPT), algorithm, model, str(out), package]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo"])
def test_two_processes_match_trl(algorithm, tiny_model_path, tmp_path):
    ours = _run(algorithm, "llm_trainer", tiny_model_path, tmp_path / "ours")
    theirs = _run(algorithm, "trl", tiny_model_path, tmp_path / "trl")
    assert ours["world_size"] == theirs["world_size"] == 2
    assert ours["completions"] == theirs["completions"]
    assert len(ours["logs"]) == len(theirs["logs"]) == 2
    # Metrics that can be near zero (DPO rewards, GRPO's loss and KL) within float32 rounding of their terms (helpers)
    loss_scale = 1.0 if algorithm == "grpo" else None  # GRPO's loss averages O(1) advantage × ratio terms
    assert_same_logs(
        ours["logs"], theirs["logs"], skip=(), rtol=1e-4, loss_rtol=1e-4, loss_scale=loss_scale, beta=ours["beta"]
    )

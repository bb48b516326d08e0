"""FSDP2 on one GPU process (`accelerate launch` with the shipped `fsdp2` preset, `--num_processes 1`): SFT, DPO
and GRPO train with the policy's parameters as DTensors (the real FSDP2 path, not a silent fallback) and give the
per-step losses of the same run without FSDP (`single_gpu` preset)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent.parent / "llm_trainer" / "accelerate_configs"
WORKER = HERE / "launched_run.py"
LOSS_REL = 2e-2  # bf16; FSDP2's mixed-precision policy and Accelerate's autocast round differently


def launch(preset: str, *args: str) -> dict:
    """Run `launched_run.py args` under `accelerate launch` with `preset` on 1 process; its result."""
    sys.path.insert(0, str(HERE.parent / "distributed"))
    from fsdp_run import run_torchrun

    (result,) = run_torchrun(WORKER, list(args), nproc=1, accelerate_config=PRESETS / f"{preset}.yaml", timeout=1200)
    return result


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo"])
def test_fsdp2_one_gpu_process(small_model, tmp_path, algorithm):
    sharded = launch("fsdp2", algorithm, small_model, str(tmp_path / "fsdp2"))
    assert sharded["fsdp"] and sharded["distributed_type"] == "DistributedType.FSDP"
    assert sharded["layout"]["all_dtensor"] and sharded["layout"]["devices"] == ["cuda:0"]
    plain = launch("single_gpu", algorithm, small_model, str(tmp_path / "plain"))
    assert not plain["fsdp"] and not plain["layout"]["all_dtensor"]
    assert len(sharded["losses"]) == 2
    if algorithm != "grpo":  # GRPO samples: the completions, hence the losses, may differ between engines
        assert sharded["losses"] == pytest.approx(plain["losses"], rel=LOSS_REL)

"""DeepSpeed ZeRO-3 on one GPU process (`accelerate launch` with the shipped `zero3` preset, `--num_processes 1`):
SFT, DPO with precomputed reference log-probs, and GRPO (generation gathers the partitioned weights, then releases
them) train with the policy's parameters partitioned by ZeRO-3, with the per-step losses of the run without
DeepSpeed (`single_gpu` preset).

The same checks run on CPU with 2 processes in tests/distributed/test_deepspeed.py (DS_ACCELERATOR=cpu, gloo);
here they run on the GPU with NCCL, bf16 and DeepSpeed's CUDA ops."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .test_fsdp2_gpu import launch

LOSS_REL = 2e-2  # bf16: DeepSpeed's bf16 engine holds bf16 weights, the plain run autocasts fp32 weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (`pip install deepspeed`)"
)


def _reference_policy_zero3_ready() -> bool:
    """Whether the reference policy copies a partitioned policy with `zero3_copy` and precomputes under
    `zero3_layerwise_gathered` (see tests/distributed/test_deepspeed.py); DPO and GRPO under ZeRO-3 need both."""
    import inspect

    from llm_trainer.trainer import reference_policy

    source = inspect.getsource(reference_policy)
    return "zero3_copy" in source and "zero3_layerwise_gathered" in source


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [("sft", {}), ("dpo", {"precompute_ref_log_probs": True}), ("dpo", {}), ("grpo", {"beta": 0.04})],
    ids=["sft", "dpo-precompute", "dpo-reference-model", "grpo"],
)
def test_zero3_one_gpu_process(small_model, tmp_path, algorithm, extra):
    if algorithm != "sft" and not _reference_policy_zero3_ready():
        pytest.skip("llm_trainer/trainer/reference_policy.py does not use zero3_copy / zero3_layerwise_gathered yet")
    options = json.dumps(extra)
    sharded = launch("zero3", algorithm, small_model, str(tmp_path / "zero3"), options)
    assert sharded["deepspeed"] and sharded["distributed_type"] == "DistributedType.DEEPSPEED"
    assert sharded["layout"]["all_zero3"]
    plain = launch("single_gpu", algorithm, small_model, str(tmp_path / "plain"), options)
    assert not plain["deepspeed"] and not plain["layout"]["all_zero3"]
    assert len(sharded["losses"]) == 2
    if algorithm != "grpo":
        assert sharded["losses"] == pytest.approx(plain["losses"], rel=LOSS_REL)

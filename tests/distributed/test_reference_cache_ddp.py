"""The reference log-prob cache across two processes (gloo on CPU): DPO with `precompute_ref_log_probs=True` under
DDP, under FSDP2 (the test-only shim; a separate reference model, its parameters and the policy's asserted
sharded, so the reference pass is collective) and under DeepSpeed ZeRO-3 (the shipped preset,
`DS_ACCELERATOR=cpu`: the policy is partitioned at load, so the reference pass itself is collective). The
first run computes on every rank and writes one file; the second run makes no reference forward on any rank, and
every rank holds the first run's columns and trains with its per-step losses.

Run as a script (`python test_reference_cache_ddp.py MODE MODEL OUT` under torchrun) it is the launched training
run: it counts the reference batches (`DPOTrainer.reference_batch_logps`) and reports per rank."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "dataloader_pin_memory": False,
    "seed": 3,
    "precompute_ref_log_probs": True,
    "precompute_ref_batch_size": 4,
}
FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}


def launched(mode: str, model: str, out: str) -> None:
    """One training run on this rank (see the module docstring)."""
    fsdp_run = importlib.import_module("fsdp_run")
    shim = importlib.import_module("fsdp_shim")
    if mode == "fsdp2":
        shim.enable_cpu_fsdp2()
    import torch.distributed as dist

    from llm_trainer import DPOConfig, DPOTrainer
    from llm_trainer.testing import zen_dataset

    forwards = []
    original = DPOTrainer.reference_batch_logps

    def counted(self, batch):
        forwards.append(len(batch["prompt_input_ids"]) if "prompt_input_ids" in batch else 1)
        return original(self, batch)

    DPOTrainer.reference_batch_logps = counted
    extra = FSDP2 if mode == "fsdp2" else {}
    if mode == "zero3":  # launched by `accelerate launch` with the zero3 preset: DeepSpeed on CPU over gloo
        extra = {"use_cpu": False, "ddp_backend": "gloo"}
    args = DPOConfig(output_dir=out, **{**COMMON, **extra})
    # Under FSDP2 a separate reference, sharded like the policy: its pass is a collective over DTensor weights, and
    # each rank hashes its own shards (the ranks' keys are combined into one).
    ref_model = model if mode == "fsdp2" else None
    trainer = DPOTrainer(model, ref_model=ref_model, args=args, train_dataset=zen_dataset("standard_preference"))
    if mode == "fsdp2":
        shim.assert_sharded(trainer.ref_model)
    columns = {c: list(trainer.train_dataset[c]) for c in trainer.reference_columns}
    trainer.train()
    sharded = None
    if mode == "fsdp2":
        shim.assert_sharded(trainer.model_wrapped)
        sharded = True
    if mode == "zero3":  # every parameter partitioned: this rank holds a part of each larger one
        params = list(trainer.model.parameters())
        sharded = trainer.model_wrapped.zero_optimization_stage() == 3 and all(
            p.ds_tensor.numel() < p.ds_numel for p in params if p.ds_numel > 64
        )
    fsdp_run.write_result(
        {
            "rank": dist.get_rank(),
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": getattr(trainer.accelerator.distributed_type, "value", None),
            "sharded": sharded,
            "forwards": len(forwards),
            "columns": columns,
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        }
    )
    fsdp_run.finish()


if __name__ == "__main__":
    launched(*sys.argv[1:4])


import pytest  # noqa: E402


def _zero3_preset(tmp_path: Path) -> str:
    """The shipped zero3 preset in fp32 (gloo on CPU)."""
    preset = HERE.parent.parent / "llm_trainer" / "accelerate_configs" / "zero3.yaml"
    path = tmp_path / "zero3.yaml"
    path.write_text(preset.read_text().replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return str(path)


def _two_runs(mode: str, model: str, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    run_torchrun = importlib.import_module("fsdp_run").run_torchrun
    env = {"LLM_TRAINER_CACHE": str(tmp_path / "cache")}
    launch = {}
    if mode == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
        launch = {"accelerate_config": _zero3_preset(tmp_path), "timeout": 600}
    first = run_torchrun(__file__, [mode, model, str(tmp_path / "first")], env=env, **launch)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1, files  # one file, written by the main process only
    second = run_torchrun(__file__, [mode, model, str(tmp_path / "second")], env=env, **launch)
    return first, second


@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        pytest.param("fsdp2", marks=pytest.mark.slow),
        pytest.param("zero3", marks=pytest.mark.slow),
    ],
)
def test_second_distributed_run_makes_no_reference_forward(mode, tiny_model_path, tmp_path):
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (`pip install deepspeed`)")
    first, second = _two_runs(mode, tiny_model_path, tmp_path)
    for run in (first, second):
        assert [r["rank"] for r in run] == [0, 1] and all(r["world_size"] == 2 for r in run)
        if mode != "ddp":
            expected = {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}[mode]
            assert all(r["distributed_type"] == expected and r["sharded"] for r in run), run
    assert all(r["forwards"] > 0 for r in first)  # the first run computes on every rank (a collective pass)
    assert [r["forwards"] for r in second] == [0, 0]  # the second computes on none
    reference = first[0]["columns"]
    assert len(reference["ref_chosen_logps"]) == 17
    for result in first + second:
        assert result["columns"] == reference
    assert second[0]["losses"] == first[0]["losses"] and len(first[0]["losses"]) == 2

"""One training run under `accelerate launch` on the GPU, for the FSDP2 and ZeRO-3 checks of the GPU suite:
`accelerate launch --config_file PRESET --num_processes 1 launched_run.py ALGORITHM MODEL OUT [EXTRA_JSON]`.

Trains SFT, DPO (EXTRA_JSON may set `precompute_ref_log_probs`) or GRPO for 2 steps in bf16 and records, through
`tests/distributed/fsdp_run.write_result`, the engine Accelerate actually used and how the weights are held:
FSDP2 DTensors, or DeepSpeed ZeRO-3 partitions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "distributed"))

COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "logging_steps": 1,
    "bf16": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 3,
}


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def weights_layout(model) -> dict:
    """How the policy's parameters are held: DTensor (FSDP2) and/or ZeRO-3 partitioned, and whether every one is."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "all_dtensor": bool(params) and all(isinstance(p, DTensor) for p in params),
        "all_zero3": bool(params) and all(hasattr(p, "ds_id") for p in params),
        "devices": sorted({str(p.device) for p in params}),
    }


def main(algorithm: str, model: str, out: str, extra: str = "{}") -> None:
    from fsdp_run import finish, write_result

    import llm_trainer
    from llm_trainer.testing import zen_dataset

    options = {**COMMON, **json.loads(extra)}
    if algorithm == "grpo":
        args = llm_trainer.GRPOConfig(output_dir=out, num_generations=4, max_completion_length=16, **options)
        trainer = llm_trainer.GRPOTrainer(
            model, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only")
        )
    elif algorithm == "dpo":
        args = llm_trainer.DPOConfig(output_dir=out, **options)
        trainer = llm_trainer.DPOTrainer(model, args=args, train_dataset=zen_dataset("conversational_preference"))
    else:
        args = llm_trainer.SFTConfig(output_dir=out, **options)
        trainer = llm_trainer.SFTTrainer(
            model, args=args, train_dataset=zen_dataset("conversational_prompt_completion")
        )
    trainer.train()
    write_result(
        {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "num_processes": trainer.accelerator.num_processes,
            "deepspeed": trainer.is_deepspeed_enabled,
            "fsdp": trainer.is_fsdp_enabled,
            "layout": weights_layout(trainer.model_wrapped if trainer.is_fsdp_enabled else trainer.model),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
    )
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])

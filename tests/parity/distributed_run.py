"""One training run under `torchrun`, for the distributed parity test:
`python distributed_run.py ALGORITHM MODEL OUT PACKAGE` trains the tiny model with `PACKAGE`'s (llm_trainer or trl)
SFT, DPO or GRPO trainer and writes the per-step logs (and GRPO's completions) to `OUT/result.json`."""

import importlib
import json
import os
import sys

from llm_trainer.testing import zen_dataset

COMMON = {
    "report_to": "none",
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 3,
}


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def build(algorithm: str, module, model: str, out: str):
    if algorithm == "grpo":
        args = module.GRPOConfig(output_dir=out, num_generations=4, max_completion_length=8, beta=0.04, **COMMON)
        return module.GRPOTrainer(model, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))
    if algorithm == "dpo":
        args = module.DPOConfig(output_dir=out, **COMMON)
        return module.DPOTrainer(model, args=args, train_dataset=zen_dataset("conversational_preference"))
    args = module.SFTConfig(output_dir=out, **COMMON)
    return module.SFTTrainer(model, args=args, train_dataset=zen_dataset("conversational_prompt_completion"))


def main(algorithm: str, model: str, out: str, package: str) -> None:
    trainer = build(algorithm, importlib.import_module(package), model, out)
    trainer.train()
    if trainer.accelerator.is_main_process:
        result = {
            "world_size": trainer.accelerator.num_processes,
            "beta": getattr(trainer.args, "beta", None),
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
            "completions": list(trainer._logs["completion"]) if algorithm == "grpo" else [],
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's and the trainers' background threads can abort or hang it


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""One GRPO run under `torchrun`, for the distributed parity test: `python grpo_distributed_run.py MODEL OUT PACKAGE`
trains with `PACKAGE` (llm_trainer or trl) and writes the logs and completions to `OUT/result.json`."""

import importlib
import json
import os
import sys

from llm_trainer.testing import zen_dataset


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def main(model: str, out: str, package: str) -> None:
    module = importlib.import_module(package)
    args = module.GRPOConfig(
        output_dir=out,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        beta=0.04,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    trainer = module.GRPOTrainer(model, length_reward, args=args, train_dataset=zen_dataset("standard_prompt_only"))
    trainer.train()
    if trainer.accelerator.is_main_process:
        result = {
            "world_size": trainer.accelerator.num_processes,
            "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
            "completions": list(trainer._logs["completion"]),
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's and the trainers' background threads can abort or hang it


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""One SFT run for the kill-and-resume test: `python checkpoint_kill_run.py MODEL OUT [KILL_STAGE KILL_STEP]`.

Trains the tiny model for `MAX_STEPS` steps with a checkpoint every step (resuming from the newest complete checkpoint
in OUT when there is one) and appends each step's loss to `OUT/losses.jsonl` as it is logged. With KILL_STAGE, the
process SIGKILLs itself in the middle of saving the checkpoint of step KILL_STEP, right after that stage:
`weights` (model written), `optimizer` (optimizer and scheduler written), `rng` (RNG state written), `state` (trainer
state written into the staging folder, not yet renamed into place) or `committed` (renamed, before older checkpoints
are rotated out).
"""

import json
import os
import signal
import sys

from transformers import Trainer, TrainerCallback, TrainerState

import llm_trainer.trainer.checkpointing as checkpointing
from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.testing import zen_dataset

MAX_STEPS = 12


class RecordLosses(TrainerCallback):
    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            line = json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line.encode())  # one write: a kill never leaves half a line
            finally:
                os.close(fd)


def kill_after(owner, name: str, when) -> None:
    """Replace `owner.name` by a version that SIGKILLs this process after the original returns, when `when(...)`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def arm(stage: str, step: int) -> None:
    def at_step(trainer, *args, **kwargs):
        return trainer.state.global_step == step

    if stage == "weights":
        kill_after(
            Trainer, "save_model", lambda trainer, output_dir=None, **kw: at_step(trainer) and "tmp-" in output_dir
        )
    elif stage == "optimizer":
        kill_after(Trainer, "_save_optimizer_and_scheduler", at_step)
    elif stage == "rng":
        kill_after(Trainer, "_save_rng_state", at_step)
    elif stage == "state":
        kill_after(TrainerState, "save_to_json", lambda state, path: state.global_step == step and "tmp-" in path)
    elif stage == "committed":
        kill_after(checkpointing, "commit_folder", lambda staged, final: final.endswith(f"checkpoint-{step}"))
    else:
        raise ValueError(f"unknown stage {stage!r}")


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        arm(sys.argv[3], int(sys.argv[4]))
    args = SFTConfig(
        output_dir=out,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1,
        save_total_limit=2,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=7,
    )
    trainer = SFTTrainer(
        model,
        args=args,
        train_dataset=zen_dataset("standard_language_modeling"),
        callbacks=[RecordLosses(os.path.join(out, "losses.jsonl"))],
    )
    resume = os.path.isdir(out) and any(name.startswith("checkpoint-") for name in os.listdir(out))
    trainer.train(resume_from_checkpoint=True if resume else None)


if __name__ == "__main__":
    main()

"""Generalized knowledge distillation (GKD) on CPU in seconds: a tiny student learns from a wider tiny teacher.

    python examples/gkd.py

Both models are random-weight tiny Qwen2 models built by `llm_trainer.testing` (same tokenizer and vocabulary); the
data are the offline "zen" conversations. Half the steps (`lmbda=0.5`) train on completions the student samples;
the others on the dataset's assistant turns. Swap in real checkpoints (e.g. Qwen2.5-0.5B-Instruct as the student and
Qwen2.5-1.5B-Instruct as the teacher) and a `messages` dataset for a real run.
"""

from __future__ import annotations

import tempfile

from llm_trainer import GKDConfig, GKDTrainer
from llm_trainer.testing import make_tiny_model, zen_dataset


def main() -> None:
    folder = tempfile.mkdtemp(prefix="gkd-example-")
    student = make_tiny_model(f"{folder}/student", seed=0)
    teacher = make_tiny_model(f"{folder}/teacher", seed=1, hidden_size=48)
    config = GKDConfig(
        output_dir=f"{folder}/out",
        lmbda=0.5,  # probability that a step trains on the student's own samples
        beta=0.5,  # 0 = forward KL, 0.5 = JSD, 1 = reverse KL
        temperature=0.9,  # sampling temperature
        max_new_tokens=16,
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=zen_dataset("conversational_language_modeling"),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print("GKD losses:", [round(loss, 5) for loss in losses])


if __name__ == "__main__":
    main()

"""A real SFT run on CPU in seconds: a tiny model learns to complete the Zen of Python.

    python -m llm_trainer.demo [--steps 120] [--output-dir outputs/demo]

Builds a tiny random-weight Qwen2 model with the shipped tokenizer, prints what it writes for a few prompts,
trains it with `SFTTrainer` on the built-in conversational prompt-completion dataset (a rich progress bar shows
the steps), prints the loss falling, and prints the completions again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from datasets import concatenate_datasets
from transformers import PrinterCallback

from .callbacks import RichProgressCallback
from .testing import make_tiny_model, zen_dataset
from .trainer.sft_config import SFTConfig
from .trainer.sft_trainer import SFTTrainer

PROMPTS = [0, 4, 14]  # rows of the dataset whose answers are shown before and after


def _complete(trainer: SFTTrainer, prompts: list[list[dict]]) -> list[str]:
    tokenizer, model = trainer.processing_class, trainer.model
    model.eval()
    outputs = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        generated = model.generate(**ids, max_new_tokens=16, do_sample=False)
        outputs.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (default: 120)")
    parser.add_argument("--output-dir", default=os.path.join("outputs", "demo"), help="where the model is saved")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    model_path = make_tiny_model(tempfile.mkdtemp(prefix="llm-trainer-demo-"), hidden_size=64, num_hidden_layers=2)
    dataset = concatenate_datasets([zen_dataset("conversational_prompt_completion", s) for s in ("train", "test")])
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        logging_steps=10,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(model=model_path, args=config, train_dataset=dataset, callbacks=[RichProgressCallback()])
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the logs
    prompts = [dataset[i]["prompt"] for i in PROMPTS]
    before = _complete(trainer, prompts)

    console.rule("[bold]llm_trainer demo: SFT of a tiny Qwen2 model on CPU")
    console.print(f"model: {model_path} ({trainer.model.num_parameters():,} parameters), {len(dataset)} examples")
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start

    losses = [
        (log["step"], log["loss"], log["mean_token_accuracy"]) for log in trainer.state.log_history if "loss" in log
    ]
    table = Table(title="Training loss")
    for column in ("step", "loss", "mean_token_accuracy"):
        table.add_column(column, justify="right")
    for step, loss, accuracy in losses:
        table.add_row(str(step), f"{loss:.4f}", f"{accuracy:.3f}")
    console.print(table)

    after = _complete(trainer, prompts)
    samples = Table(title="Completions before and after training")
    for column in ("prompt", "before", "after", "reference"):
        samples.add_column(column)
    for i, prompt, old, new in zip(PROMPTS, prompts, before, after):
        samples.add_row(prompt[-1]["content"], repr(old), repr(new), dataset[i]["completion"][0]["content"])
    console.print(samples)
    trainer.save_model(args.output_dir)
    console.print(
        f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} in {elapsed:.0f}s; model saved to {args.output_dir}"
    )


if __name__ == "__main__":
    main()

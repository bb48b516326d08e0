"""SFT step time and peak RSS: llm_trainer vs TRL 1.16 vs a minimal PyTorch loop, side by side in one run.

    python benchmarks/sft_step.py [--steps 10] [--warmup 3] [--gradient-checkpointing]

Same Llama-style model (vocab 32000, hidden 256, 4 layers, fp32, CPU), same random token batches (8 x 256), same
seed. The minimal loop is `model(input_ids, labels=labels).loss.backward(); AdamW.step()`. Both trainers run with
`bf16=False` and, unless `--gradient-checkpointing`, without gradient checkpointing, so all three do the same
arithmetic. Each runner is a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own: the table shows it whole
and above the process's RSS once the model and data are built. Prints a table, writes `results/sft_step.json`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from step_report import RUNNERS, emit, report, rss_mb, run_child, step_timer

SHAPE = {"vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4, "batch_size": 8, "seq_len": 256}


def _model_and_rows(n_rows: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["hidden_size"],
        num_hidden_layers=SHAPE["num_hidden_layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * SHAPE["hidden_size"],
        max_position_embeddings=SHAPE["seq_len"],
        pad_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    rows = torch.randint(2, SHAPE["vocab_size"], (n_rows, SHAPE["seq_len"])).tolist()
    return model, rows


def run_minimal(steps: int, warmup: int, _checkpointing: bool) -> dict:
    import torch

    model, rows = _model_and_rows(SHAPE["batch_size"] * (steps + warmup))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    base = rss_mb()
    times = []
    for i in range(steps + warmup):
        batch = torch.tensor(rows[i * SHAPE["batch_size"] : (i + 1) * SHAPE["batch_size"]])
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"step_times": times[warmup:], "base_rss_mb": base}


def run_trainer(library: str, steps: int, warmup: int, checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    if library == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from llm_trainer import SFTConfig, SFTTrainer
    from llm_trainer.testing import get_tokenizer

    model, rows = _model_and_rows(SHAPE["batch_size"] * (steps + warmup))
    tokenizer: PreTrainedTokenizerFast = get_tokenizer()  # only its pad token id is used: data is pre-tokenized
    dataset = Dataset.from_dict({"input_ids": rows})
    times: list[float] = []

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + warmup,
        per_device_train_batch_size=SHAPE["batch_size"],
        max_length=SHAPE["seq_len"],
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[step_timer(times)]
    )
    base = rss_mb()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"step_times": times[warmup:], "base_rss_mb": base, "losses": losses}


def child(name: str, steps: int, warmup: int, checkpointing: bool) -> None:
    if name == "minimal loop":
        result = run_minimal(steps, warmup, checkpointing)
    else:
        result = run_trainer("trl" if name.startswith("trl") else "llm_trainer", steps, warmup, checkpointing)
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in both trainers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.warmup, args.gradient_checkpointing)

    results = {}
    for name in RUNNERS:
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        results[name] = run_child(command)
    settings = {"shape": SHAPE, "gradient_checkpointing": args.gradient_checkpointing}
    report("sft_step", "SFT step, fp32, CPU", results, settings, "_gc" if args.gradient_checkpointing else "")


if __name__ == "__main__":
    main()

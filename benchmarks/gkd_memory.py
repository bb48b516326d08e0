"""GKD step time and peak RSS at vocab 32k: llm_trainer's `GKDTrainer` vs TRL 1.16's `trl.experimental.gkd`.

    python benchmarks/gkd_memory.py [--steps 3] [--warmup 1] [--lmbda 0.0] [--threads N]

Same Llama-style student (vocab 32000, hidden 64, 2 layers) and wider teacher (hidden 128), fp32 on CPU, the same
conversations (the shipped tiny tokenizer's chat template; about 200 tokens each, ~150 of them completion), batch 8,
same seed. `--lmbda 0` (the default) trains on the dataset's completions, so both do the same arithmetic; `--lmbda 1`
samples `max_new_tokens=64` completions each step. TRL builds the student's and the teacher's `(batch, seq, 32000)`
logits and the divergence's vocab-sized intermediates; llm_trainer projects only the completion positions, one chunk
at a time. Each runner is a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own: the table shows it whole and
above the process's RSS once the models and data are built. Prints a table, writes `results/gkd_memory.json`
(`_lmbda<λ>` when not 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

from step_report import RESULTS, emit, rss_mb, run_child, step_timer

SHAPE = {"vocab_size": 32000, "student_hidden": 64, "teacher_hidden": 128, "num_hidden_layers": 2, "batch_size": 8}
RUNNERS = ("llm_trainer", "trl 1.16")
WORDS = "beautiful better ugly explicit implicit simple complex flat nested sparse dense readability counts".split()


def _model(hidden: int, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llm_trainer.testing import get_tokenizer

    tokenizer = get_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=SHAPE["num_hidden_layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def _dataset(n_rows: int):
    import random

    from datasets import Dataset

    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        question = " ".join(rng.choice(WORDS) for _ in range(25))
        answer = " ".join(rng.choice(WORDS) for _ in range(120))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def run_trainer(library: str, steps: int, warmup: int, lmbda: float) -> dict:
    if library == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    else:
        from llm_trainer import GKDConfig, GKDTrainer
    from llm_trainer.testing import get_tokenizer

    student, teacher = _model(SHAPE["student_hidden"], 0), _model(SHAPE["teacher_hidden"], 1)
    dataset = _dataset(SHAPE["batch_size"] * (steps + warmup))
    times: list[float] = []
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + warmup,
        per_device_train_batch_size=SHAPE["batch_size"],
        lmbda=lmbda,
        beta=0.5,
        max_new_tokens=64,
        max_length=512,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=get_tokenizer(),
        callbacks=[step_timer(times)],
    )
    base = rss_mb()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"step_times": times[warmup:], "base_rss_mb": base, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lmbda", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per runner (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        library = "trl" if args.child.startswith("trl") else "llm_trainer"
        return emit(run_trainer(library, args.steps, args.warmup, args.lmbda))

    results = {}
    for name in RUNNERS:
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--lmbda", str(args.lmbda), "--threads", str(args.threads)]
        results[name] = run_child(command)
    ours, trl = results["llm_trainer"], results["trl 1.16"]
    header = "| runner       | step (s) | vs TRL | peak RSS (MB) | vs TRL | above setup (MB) | vs TRL |"
    print(f"GKD step, fp32, CPU, lmbda={args.lmbda}, threads={args.threads or 'default'}, shape={SHAPE}")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        r["above_setup_mb"] = r["peak_rss_mb"] - r["base_rss_mb"]
        r["time_vs_trl"] = r["median_step_s"] / trl["median_step_s"]
        r["peak_rss_vs_trl"] = r["peak_rss_mb"] / trl["peak_rss_mb"]
        r["above_setup_vs_trl"] = r["above_setup_mb"] / (trl["peak_rss_mb"] - trl["base_rss_mb"])
        print(
            f"| {name:<12} | {r['median_step_s']:8.3f} | {r['time_vs_trl']:5.2f}x | {r['peak_rss_mb']:13.0f} "
            f"| {r['peak_rss_vs_trl']:5.2f}x | {r['above_setup_mb']:16.0f} | {r['above_setup_vs_trl']:5.2f}x |"
        )
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], trl["losses"]))
    print(f"loss parity llm_trainer vs TRL over {len(ours['losses'])} steps: max relative difference {worst:.2e}")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    payload = {
        "benchmark": "gkd_memory",
        "shape": SHAPE,
        "lmbda": args.lmbda,
        "threads": args.threads,
        "loss_max_rel_diff_vs_trl": worst,
        "machine": machine,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.lmbda == 0 else f"_lmbda{args.lmbda:g}"
    (RESULTS / f"gkd_memory{suffix}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

"""GRPO step time and peak RSS: llm_trainer vs TRL 1.16 vs a minimal PyTorch loop, side by side in one run.

    python benchmarks/grpo_step.py [--case default|long-prompt] [--steps 10] [--warmup 3] [--batch N] [--beta 0.0]
                                   [--gradient-checkpointing] [--threads N]

Same model as `dpo_step.py` (Llama-style, vocab 32000, hidden 256, 4 layers, fp32, CPU, the shipped tokenizer),
saved once and loaded by every runner; same 16 prompts of 32 single-token words (so every prompt is exactly 32
tokens); `num_generations=8`, `max_completion_length=64`, sampling at temperature 1 (no top-k / top-p) with
`transformers`' `generate` (`use_vllm=False`); `--batch` completions a step (default 8: one prompt group); the same
reward (the fraction of a completion's characters that are letters). Both trainers run the default loss
(`loss_type="dapo"`, `scale_rewards="group"`) with `bf16=False`, `beta` (default 0: no reference model) and, unless
`--gradient-checkpointing`, without gradient checkpointing. The minimal loop is the textbook GRPO step:
`model.generate`, full logits → `log_softmax` + gather over the completion tokens, group-normalised advantages,
the token-level (DAPO-normalised) policy-gradient loss (+ β·KL to a frozen copy when `--beta` > 0), backward, AdamW.

Generation is timed apart: each trainer's generation entry point (ours `trainer.generator.generate`, TRL's
`GRPOTrainer._generate_single_turn`) is wrapped at run time with a timer, and whole steps are timed by a
`TrainerCallback`; training time = step time − generation time (it includes scoring and the loss forward/backward).
A random-init model almost never samples eos, so completions run to 64 tokens in every runner: the mean completion
length is printed so the comparison can be checked fair. Each runner is a fresh subprocess, so its peak RSS
(`ru_maxrss`) is its own. Prints two tables, writes `results/grpo_step.json` (`_b<N>`, `_beta<β>`, `_gc`, `_t<N>`
suffixes for the non-default settings).

`--case long-prompt`: the same, with 512-token prompts (512 single-token words), 2 groups a step (`--batch`
default 16) and the model's `max_position_embeddings` raised to 1024 (the weights are the same: RoPE has no learned
positions); writes `results/grpo_step_long-prompt.json`. Here the prompt is 8x the completion, so the cost is in
prefilling and scoring the prompt once per completion, which is what sharing the prompt of a group saves.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from dpo_step import build_model
from step_report import ENV, RUNNERS, emit, report, rss_mb, run_child, step_timer

SHAPE = {"vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4, "n_prompts": 16, "prompt_len": 32}
# What each `--case` changes: the prompt length, the default completions a step and the model's position limit.
CASES = {
    "default": {"prompt_len": 32, "batch": 8, "max_positions": 256},
    "long-prompt": {"prompt_len": 512, "batch": 16, "max_positions": 1024},
}
NUM_GENERATIONS = 8
MAX_COMPLETION_LENGTH = 64
LEARNING_RATE = 1e-6


def letter_fraction(completions: list[str], **kwargs) -> list[float]:
    """The reward every runner uses: the fraction of a completion's characters that are letters."""
    return [sum(c.isalpha() for c in text) / max(len(text), 1) for text in completions]


def _prompts(tokenizer, prompt_len: int) -> list[str]:
    """`n_prompts` random strings of `prompt_len` single-token words (fixed seed), each exactly `prompt_len` tokens."""
    import random

    words = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    words = sorted(w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    rng = random.Random(0)
    prompts = ["".join(" " + rng.choice(words) for _ in range(prompt_len)) for _ in range(SHAPE["n_prompts"])]
    lengths = {len(ids) for ids in tokenizer(prompts)["input_ids"]}
    assert lengths == {prompt_len}, lengths
    return prompts


def _timed(fn, sink: list[float]):
    """`fn`, appending the seconds each call takes to `sink`."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return wrapper


def run_minimal(
    model_path: str, steps: int, warmup: int, checkpointing: bool, beta: float, batch: int, prompt_len: int
) -> dict:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if beta else None
    prompt_ids = tokenizer(_prompts(tokenizer, prompt_len))["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    eos, groups, width = tokenizer.eos_token_id, batch // NUM_GENERATIONS, prompt_len
    base = rss_mb()

    def token_logps(m, sequences, attention_mask):
        logits = m(input_ids=sequences, attention_mask=attention_mask).logits[:, width - 1 : -1]
        return torch.gather(logits.log_softmax(-1), 2, sequences[:, width:, None]).squeeze(2)

    step_times, generation_times, lengths, rewards_seen = [], [], [], []
    for i in range(steps + warmup):
        rows = [prompt_ids[(i * groups + g) % len(prompt_ids)] for g in range(groups) for _ in range(NUM_GENERATIONS)]
        input_ids = torch.tensor(rows)
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=MAX_COMPLETION_LENGTH,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        model.train()
        generated = time.perf_counter()
        completions = sequences[:, width:]
        is_eos = completions == eos
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.size(1) - 1)
        mask = (torch.arange(completions.size(1))[None] <= ends[:, None]).float()
        texts = tokenizer.batch_decode(completions.masked_fill(mask == 0, eos), skip_special_tokens=True)
        rewards = torch.tensor(letter_fraction(texts)).view(groups, NUM_GENERATIONS)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        attention_mask = torch.cat([torch.ones_like(input_ids), mask.long()], 1)
        logps = token_logps(model, sequences, attention_mask)
        per_token_loss = -torch.exp(logps - logps.detach()) * advantages
        if ref_model is not None:
            with torch.no_grad():
                delta = token_logps(ref_model, sequences, attention_mask) - logps
            per_token_loss = per_token_loss + beta * (torch.exp(delta) - delta - 1)
        loss = (per_token_loss * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)
        generation_times.append(generated - start)
        lengths.append(mask.sum(1).mean().item())
        rewards_seen.append(rewards.mean().item())
    return {
        "step_times": step_times[warmup:],
        "generation_times": generation_times[warmup:],
        "base_rss_mb": base,
        "mean_completion_length": sum(lengths[warmup:]) / steps,
        "mean_reward": sum(rewards_seen[warmup:]) / steps,
    }


def run_trainer(
    library: str,
    model_path: str,
    steps: int,
    warmup: int,
    checkpointing: bool,
    beta: float,
    batch: int,
    prompt_len: int,
) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    if library == "trl":
        from trl import GRPOConfig, GRPOTrainer
    else:
        from llm_trainer import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = Dataset.from_dict({"prompt": _prompts(tokenizer, prompt_len)})
    step_times: list[float] = []
    generation_times: list[float] = []

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + warmup,
        per_device_train_batch_size=batch,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        beta=beta,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=letter_fraction,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_timer(step_times)],
    )
    if library == "trl":
        trainer._generate_single_turn = _timed(trainer._generate_single_turn, generation_times)
    else:
        trainer.generator.generate = _timed(trainer.generator.generate, generation_times)
    base = rss_mb()
    trainer.train()
    assert len(generation_times) == len(step_times) == steps + warmup, (len(generation_times), len(step_times))
    logs = [log for log in trainer.state.log_history if "completions/mean_length" in log][warmup:]
    return {
        "step_times": step_times[warmup:],
        "generation_times": generation_times[warmup:],
        "base_rss_mb": base,
        "mean_completion_length": sum(log["completions/mean_length"] for log in logs) / len(logs),
        "mean_reward": sum(log["reward"] for log in logs) / len(logs),
    }


def child(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompt_len = CASES[args.case]["prompt_len"]
    settings = (
        args.model_path,
        args.steps,
        args.warmup,
        args.gradient_checkpointing,
        args.beta,
        args.batch,
        prompt_len,
    )
    if args.child == "minimal loop":
        result = run_minimal(*settings)
    else:
        result = run_trainer("trl" if args.child.startswith("trl") else "llm_trainer", *settings)
    result["training_times"] = [s - g for s, g in zip(result["step_times"], result["generation_times"])]
    emit(result)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def split_times(results: dict) -> str:
    """Add the median generation and training times and their ratios to `results`; return them as a table."""
    header = (
        "| runner       | generation (s) | vs minimal | vs TRL | training (s) | vs minimal | vs TRL "
        "| completion len | reward |"
    )
    rows = []
    for r in results.values():
        r["median_generation_s"] = _median(r["generation_times"])
        r["median_training_s"] = _median(r["training_times"])
    minimal, trl = results["minimal loop"], results["trl 1.16"]
    for name, r in results.items():
        for part in ("generation", "training"):
            r[f"{part}_vs_minimal"] = r[f"median_{part}_s"] / minimal[f"median_{part}_s"]
            r[f"{part}_vs_trl"] = r[f"median_{part}_s"] / trl[f"median_{part}_s"]
        rows.append(
            f"| {name:<12} | {r['median_generation_s']:14.3f} | {r['generation_vs_minimal']:9.2f}x "
            f"| {r['generation_vs_trl']:5.2f}x | {r['median_training_s']:12.3f} | {r['training_vs_minimal']:9.2f}x "
            f"| {r['training_vs_trl']:5.2f}x | {r['mean_completion_length']:14.1f} | {r['mean_reward']:6.3f} |"
        )
    rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
    title = "step = generation + training (scoring, log-probs, loss, backward, AdamW); medians over the timed steps"
    return "\n".join([title, header, rule, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case",
        choices=sorted(CASES),
        default="default",
        help="default: 32-token prompts; long-prompt: 512-token prompts, 2 groups a step",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--batch", type=int, help="completions a step, a multiple of 8 (default: 8, or 16 for long-prompt)"
    )
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 adds a reference model")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in every runner")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per runner (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = CASES[args.case]
    if args.batch is None:
        args.batch = case["batch"]
    if args.batch < NUM_GENERATIONS or args.batch % NUM_GENERATIONS:
        parser.error(f"--batch must be a positive multiple of num_generations ({NUM_GENERATIONS}), got {args.batch}.")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0.")
    if args.build_model:
        return build_model(args.build_model, max_positions=case["max_positions"])
    if args.child:
        return child(args)

    results = {}
    with tempfile.TemporaryDirectory() as model_path:
        subprocess.run(
            [sys.executable, __file__, "--case", args.case, "--build-model", model_path],
            env=ENV,
            check=True,
            capture_output=True,
        )
        for name in RUNNERS:
            command = [sys.executable, __file__, "--case", args.case, "--child", name, "--model-path", model_path]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--batch", str(args.batch), "--beta", str(args.beta)]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            command += ["--threads", str(args.threads)] if args.threads else []
            results[name] = run_child(command)
    split = split_times(results)
    settings = {
        "case": args.case,
        "shape": {**SHAPE, "prompt_len": case["prompt_len"], "max_position_embeddings": case["max_positions"]},
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "batch": args.batch,
        "beta": args.beta,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads,
    }
    suffix = (
        (f"_{args.case}" if args.case != "default" else "")
        + (f"_b{args.batch}" if args.batch != case["batch"] else "")
        + (f"_beta{args.beta:g}" if args.beta else "")
        + ("_gc" if args.gradient_checkpointing else "")
        + (f"_t{args.threads}" if args.threads else "")
    )
    report("grpo_step", f"GRPO step ({args.case}), fp32, CPU", results, settings, suffix)
    print(split)


if __name__ == "__main__":
    main()

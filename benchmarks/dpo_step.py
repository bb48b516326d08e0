"""DPO step time and peak RSS: llm_trainer vs TRL 1.16 vs a minimal PyTorch loop, side by side in one run.

    python benchmarks/dpo_step.py [--steps 10] [--warmup 3] [--gradient-checkpointing] [--threads N]

Same Llama-style model as `sft_step.py` (vocab 32000, hidden 256, 4 layers, fp32, CPU), saved once and loaded by
every runner; same random preference pairs (8 pairs a step, each sequence 256 tokens: a 128-token prompt and a
127-token completion + eos), same seed. The pairs are strings of single-token words, so both trainers tokenize them
to exactly these lengths. The minimal loop is the textbook DPO step: full logits of the policy and of a frozen copy,
`log_softmax` + gather, −logσ(β·Δ), backward, AdamW. Both trainers run the sigmoid loss with `bf16=False` and,
unless `--gradient-checkpointing`, without gradient checkpointing. Each runner is a fresh subprocess, so its peak RSS
(`ru_maxrss`) is its own. `--threads 1` pins each runner to one intra-op thread, which keeps the comparison
stable on a machine whose other cores are busy. Prints a table, writes `results/dpo_step.json` (`_gc`, `_t<N>`
suffixes for the non-default settings).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from step_report import ENV, RUNNERS, emit, report, rss_mb, run_child, step_timer

SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "batch_pairs": 8,
    "seq_len": 256,
    "prompt_len": 128,
}
BETA = 0.1


def build_model(path: str) -> None:
    """Save the benchmark model (seeded) and the shipped tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_trainer.testing import get_tokenizer

    torch.manual_seed(0)
    tokenizer = get_tokenizer()
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["hidden_size"],
        num_hidden_layers=SHAPE["num_hidden_layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * SHAPE["hidden_size"],
        max_position_embeddings=SHAPE["seq_len"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _pairs(tokenizer, n_pairs: int) -> dict[str, list[str]]:
    """Random prompt / chosen / rejected strings of single-token words (fixed seed)."""
    import random

    words = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    words = sorted(w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    rng = random.Random(0)
    completion_len = SHAPE["seq_len"] - SHAPE["prompt_len"] - 1  # + eos

    def text(n: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(n))

    return {
        "prompt": [text(SHAPE["prompt_len"]) for _ in range(n_pairs)],
        "chosen": [text(completion_len) for _ in range(n_pairs)],
        "rejected": [text(completion_len) for _ in range(n_pairs)],
    }


def run_minimal(model_path: str, steps: int, warmup: int, checkpointing: bool) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = _pairs(tokenizer, SHAPE["batch_pairs"] * (steps + warmup))
    eos = [tokenizer.eos_token_id]
    rows = []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append(
            (prompt_ids + tokenizer(chosen)["input_ids"] + eos, prompt_ids + tokenizer(rejected)["input_ids"] + eos)
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    base = rss_mb()

    def sequence_logps(m, input_ids):
        logits = m(input_ids=input_ids).logits[:, :-1]
        logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)
        return logps[:, SHAPE["prompt_len"] - 1 :].sum(-1)

    times = []
    bs = SHAPE["batch_pairs"]
    for i in range(steps + warmup):
        batch = rows[i * bs : (i + 1) * bs]
        input_ids = torch.tensor([c for c, _ in batch] + [r for _, r in batch])
        start = time.perf_counter()
        logps = sequence_logps(model, input_ids)
        with torch.no_grad():
            ref_logps = sequence_logps(ref_model, input_ids)
        chosen, rejected = (logps - ref_logps).chunk(2)
        loss = -F.logsigmoid(BETA * (chosen - rejected)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"step_times": times[warmup:], "base_rss_mb": base}


def run_trainer(library: str, model_path: str, steps: int, warmup: int, checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    if library == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from llm_trainer import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = Dataset.from_dict(_pairs(tokenizer, SHAPE["batch_pairs"] * (steps + warmup)))
    times: list[float] = []

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + warmup,
        per_device_train_batch_size=SHAPE["batch_pairs"],
        max_length=SHAPE["seq_len"],
        beta=BETA,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = DPOTrainer(
        model=model_path, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[step_timer(times)]
    )
    lengths = {len(row["prompt_ids"]) + len(row["chosen_ids"]) for row in trainer.train_dataset}
    assert lengths == {SHAPE["seq_len"]}, lengths
    base = rss_mb()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"step_times": times[warmup:], "base_rss_mb": base, "losses": losses}


def child(name: str, model_path: str, steps: int, warmup: int, checkpointing: bool, threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    if name == "minimal loop":
        result = run_minimal(model_path, steps, warmup, checkpointing)
    else:
        library = "trl" if name.startswith("trl") else "llm_trainer"
        result = run_trainer(library, model_path, steps, warmup, checkpointing)
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in every runner")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per runner (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_model:
        return build_model(args.build_model)
    if args.child:
        return child(args.child, args.model_path, args.steps, args.warmup, args.gradient_checkpointing, args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as model_path:
        subprocess.run(
            [sys.executable, __file__, "--build-model", model_path], env=ENV, check=True, capture_output=True
        )
        for name in RUNNERS:
            command = [sys.executable, __file__, "--child", name, "--model-path", model_path]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            command += ["--threads", str(args.threads)] if args.threads else []
            results[name] = run_child(command)
    settings = {"shape": SHAPE, "gradient_checkpointing": args.gradient_checkpointing, "threads": args.threads}
    suffix = ("_gc" if args.gradient_checkpointing else "") + (f"_t{args.threads}" if args.threads else "")
    report("dpo_step", "DPO step, fp32, CPU", results, settings, suffix)


if __name__ == "__main__":
    main()

"""DPO step time and peak RSS: llm_trainer vs TRL 1.16 vs a minimal PyTorch loop, side by side in one run.

    python benchmarks/dpo_step.py [--case default|varlen] [--steps 10] [--warmup 3] [--pairs N] [--max-len L]
                                  [--gradient-checkpointing] [--threads N]

Same Llama-style model as `sft_step.py` (vocab 32000, hidden 256, 4 layers, fp32, CPU), saved once and loaded by
every runner; same random preference pairs (8 pairs a step, each sequence 256 tokens: a 128-token prompt and a
127-token completion + eos), same seed. The pairs are strings of single-token words, so both trainers tokenize them
to exactly these lengths. The minimal loop is the textbook DPO step: full logits of the policy and of a frozen copy,
`log_softmax` + gather, −logσ(β·Δ), backward, AdamW. Both trainers run the sigmoid loss with `bf16=False` and,
unless `--gradient-checkpointing`, without gradient checkpointing. Each runner is a fresh subprocess, so its peak RSS
(`ru_maxrss`) is its own. `--threads 1` pins each runner to one intra-op thread, which keeps the comparison
stable on a machine whose other cores are busy. Prints a table, writes `results/dpo_step.json` (`_gc`, `_t<N>`
suffixes for the non-default settings).

`--case varlen`: the same model (its `max_position_embeddings` raised to 1024; RoPE, so the same weights), 4 pairs a
step whose prompt, chosen and rejected lengths are each drawn uniformly from 16 to 512 tokens (fixed seed; the
completions count their eos), `max_length=1024` (TRL's default; nothing is truncated). The dataset is those 4 pairs,
so every step pads the same batch in every runner. Neither trainer gets `padding_free`: TRL 1.16 ignores it (it warns
and pads), and llm_trainer's packed forward is on by default (`packed_forward=None`: wherever the model's attention
supports it), so both run as a TRL user's unchanged script would. The minimal loop pads to the longest row and masks
the prompt and the padding out of the sum. Writes `results/dpo_step_varlen.json` (`_p<N>`, `_max<L>` suffixes for
`--pairs` / `--max-len` off their defaults).
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
# What each `--case` changes: pairs a step, the length bound each of prompt / chosen / rejected is drawn up to, the
# trainers' `max_length` (TRL's default for varlen: nothing is truncated) and the model's position limit.
CASES = {
    "default": {"pairs": 8, "max_len": None, "max_length": SHAPE["seq_len"], "max_positions": SHAPE["seq_len"]},
    "varlen": {"pairs": 4, "max_len": 512, "max_length": 1024, "max_positions": 1024},
}


def build_model(path: str, max_positions: int = SHAPE["seq_len"]) -> None:
    """Save the benchmark model (seeded) and the shipped tokenizer to `path`; `max_positions` only sets the config's
    `max_position_embeddings` (RoPE: the weights do not depend on it)."""
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
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def case_lengths(case: str, pairs: int, max_len: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair of one step's batch; completions count their eos.

    `default`: every pair 128 + 128 + 128. `varlen`: each of the three drawn uniformly from [16, `max_len`] (seed 1).
    """
    import random

    if case == "default":
        completion = SHAPE["seq_len"] - SHAPE["prompt_len"]
        return [(SHAPE["prompt_len"], completion, completion)] * pairs
    rng = random.Random(1)
    return [(rng.randint(16, max_len), rng.randint(16, max_len), rng.randint(16, max_len)) for _ in range(pairs)]


def padding_stats(lengths: list[tuple[int, int, int]]) -> dict[str, int]:
    """Tokens in one step's batch: real (prompt + completion, chosen and rejected rows) and padded to the longest."""
    rows = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
    return {"real_tokens": sum(rows), "padded_tokens": len(rows) * max(rows), "longest": max(rows)}


def _pairs(tokenizer, lengths: list[tuple[int, int, int]]) -> dict[str, list[str]]:
    """Random prompt / chosen / rejected strings of single-token words (fixed seed) with `lengths`' token counts (the
    completions one word short: the trainers append eos)."""
    import random

    words = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    words = sorted(w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    rng = random.Random(0)

    def text(n: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(n))

    return {
        "prompt": [text(p) for p, _, _ in lengths],
        "chosen": [text(c - 1) for _, c, _ in lengths],
        "rejected": [text(r - 1) for _, _, r in lengths],
    }


def _dataset_lengths(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The token counts of every pair the run uses. `default`: a fresh batch every step. `varlen`: the dataset is one
    step's batch, so every step (an epoch) pads the same pairs in every runner, whatever order the trainers shuffle
    them into, and the medians compare the same work."""
    lengths = case_lengths(args.case, args.pairs, args.max_len)
    return lengths * (args.steps + args.warmup) if args.case == "default" else lengths


def run_minimal(args: argparse.Namespace) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = _pairs(tokenizer, _dataset_lengths(args))
    eos = [tokenizer.eos_token_id]
    rows = []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        chosen_ids = prompt_ids + tokenizer(chosen)["input_ids"] + eos
        rows.append((chosen_ids, prompt_ids + tokenizer(rejected)["input_ids"] + eos, len(prompt_ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    base = rss_mb()

    def sequence_logps(m, input_ids, attention_mask, completion_mask):
        logits = m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)
        return (logps * completion_mask).sum(-1)

    times = []
    bs = args.pairs
    for i in range(args.steps + args.warmup):
        batch = rows[i * bs : (i + 1) * bs] if args.case == "default" else rows
        sequences = [c for c, _, _ in batch] + [r for _, r, _ in batch]
        prompt_lens = [p for _, _, p in batch] * 2
        width = max(len(seq) for seq in sequences)
        input_ids = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for seq in sequences])
        positions = torch.arange(width - 1)[None]
        lens, starts = torch.tensor([len(seq) for seq in sequences])[:, None], torch.tensor(prompt_lens)[:, None]
        # label position t predicts token t + 1: the completion's tokens are t + 1 in [prompt_len, len)
        completion_mask = ((positions >= starts - 1) & (positions < lens - 1)).float()
        attention_mask = (torch.arange(width)[None] < lens).long() if (lens < width).any() else None
        start = time.perf_counter()
        logps = sequence_logps(model, input_ids, attention_mask, completion_mask)
        with torch.no_grad():
            ref_logps = sequence_logps(ref_model, input_ids, attention_mask, completion_mask)
        chosen, rejected = (logps - ref_logps).chunk(2)
        loss = -F.logsigmoid(BETA * (chosen - rejected)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"step_times": times[args.warmup :], "base_rss_mb": base}


def run_trainer(library: str, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    if library == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from llm_trainer import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    lengths = _dataset_lengths(args)
    dataset = Dataset.from_dict(_pairs(tokenizer, lengths))
    times: list[float] = []

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps + args.warmup,
        per_device_train_batch_size=args.pairs,
        max_length=CASES[args.case]["max_length"],
        beta=BETA,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = DPOTrainer(
        model=args.model_path,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_timer(times)],
    )
    tokenized = sorted(
        (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])) for row in trainer.train_dataset
    )
    assert tokenized == sorted(lengths), "the trainer tokenized the pairs to other lengths than drawn"
    base = rss_mb()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    # TRL's attribute (False in TRL 1.16 whatever the config says); llm_trainer's: whether its forwards ran packed
    packed = bool(getattr(trainer, "padding_free", False))
    return {"step_times": times[args.warmup :], "base_rss_mb": base, "losses": losses, "padding_free": packed}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child == "minimal loop":
        result = run_minimal(args)
    else:
        result = run_trainer("trl" if args.child.startswith("trl") else "llm_trainer", args)
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case", choices=sorted(CASES), default="default", help="default: 128+128 tokens; varlen: 16 to 512 each"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, help="preference pairs a step (default: 8, or 4 for varlen)")
    parser.add_argument("--max-len", type=int, help="varlen only: the upper bound of the lengths (default 512)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in every runner")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per runner (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = CASES[args.case]
    args.pairs = args.pairs or case["pairs"]
    if args.max_len is not None and args.case != "varlen":
        parser.error("--max-len applies to --case varlen only.")
    args.max_len = args.max_len or case["max_len"]
    if args.steps < 1 or args.warmup < 0 or args.pairs < 1:
        parser.error("--steps and --pairs must be at least 1 and --warmup at least 0.")
    if args.max_len is not None and not 16 <= args.max_len <= 512:
        parser.error(f"--max-len must be in [16, 512] (sequences stay within max_length=1024), got {args.max_len}.")
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
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--pairs", str(args.pairs)]
            command += ["--max-len", str(args.max_len)] if args.max_len is not None else []
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            command += ["--threads", str(args.threads)] if args.threads else []
            results[name] = run_child(command)
    lengths = case_lengths(args.case, args.pairs, args.max_len)
    stats = padding_stats(lengths)
    settings = {
        "case": args.case,
        "shape": {
            **{k: v for k, v in SHAPE.items() if args.case == "default" or k not in ("seq_len", "prompt_len")},
            "batch_pairs": args.pairs,
            "max_position_embeddings": case["max_positions"],
        },
        "max_length": case["max_length"],
        "pair_lengths": lengths if args.case != "default" else lengths[:1],
        **stats,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads,
    }
    suffix = (
        (f"_{args.case}" if args.case != "default" else "")
        + (f"_p{args.pairs}" if args.pairs != case["pairs"] else "")
        + (f"_max{args.max_len}" if args.max_len != case["max_len"] else "")
        + ("_gc" if args.gradient_checkpointing else "")
        + (f"_t{args.threads}" if args.threads else "")
    )
    print(
        f"one step's batch: {stats['real_tokens']} real tokens, {stats['padded_tokens']} padded to the longest row "
        f"({stats['longest']}): {stats['real_tokens'] / stats['padded_tokens']:.0%} real"
    )
    print(
        "forwards packed (the trainer's padding_free attribute): "
        + ", ".join(f"{name} {r['padding_free']}" for name, r in results.items() if "padding_free" in r)
    )
    report("dpo_step", f"DPO step ({args.case}), fp32, CPU", results, settings, suffix)


if __name__ == "__main__":
    main()

"""Reference log-prob cache: the reference pass of a DPO run with `precompute_ref_log_probs=True`, first run (cache
empty: computed and written) vs second run (same recipe: loaded), each in a fresh process.

    python benchmarks/reference_cache.py [--rows 256] [--seq-len 256] [--threads N]

Model: Qwen2-style, vocab of the shipped tokenizer, hidden 256, 4 layers, fp32, CPU, saved once. Data: `--rows`
random preference pairs of single-token words (a `seq-len/2`-token prompt, `seq-len/2 - 1`-token completions),
generated from a seed, so both runs build the same dataset. The timed span is `BaseTrainer.precompute_reference`
for the training set (the key's hashing included: the model's tensors, the dataset's Arrow buffers); the key's
hashing is also timed alone. Each run counts its reference batches. The cache lives in a temporary
`LLM_TRAINER_CACHE`. Prints a table, writes `results/reference_cache.json` (`_t<N>` suffix with `--threads`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def build_model(path: str) -> None:
    from llm_trainer.testing import make_tiny_model

    make_tiny_model(path, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def build_dataset(rows: int, seq_len: int):
    import random

    from datasets import Dataset

    from llm_trainer.testing import get_tokenizer

    tokenizer = get_tokenizer()
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    words = sorted(w for w in words if len(tokenizer(" " + w)["input_ids"]) == 1)[:300]
    rng = random.Random(0)

    def text(n):
        return "".join(" " + rng.choice(words) for _ in range(n))

    half = seq_len // 2
    return Dataset.from_list(
        [{"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)} for _ in range(rows)]
    )


def child(model: str, out: str, rows: int, seq_len: int) -> None:
    """One run in this process: build the trainer, time its reference pass, print the result."""
    from llm_trainer import DPOConfig, DPOTrainer
    from llm_trainer.trainer import reference_cache

    timings: dict[str, float] = {}
    batches = []
    original_batch = DPOTrainer.reference_batch_logps
    original_pass = DPOTrainer.precompute_reference

    def counted(self, batch):
        batches.append(1)
        return original_batch(self, batch)

    def timed(self, dataset, name):
        start = time.perf_counter()
        result = original_pass(self, dataset, name)
        timings[name] = time.perf_counter() - start
        return result

    DPOTrainer.reference_batch_logps = counted
    DPOTrainer.precompute_reference = timed
    args = DPOConfig(
        output_dir=out,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=8,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=16,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = DPOTrainer(model, args=args, train_dataset=build_dataset(rows, seq_len))
    start = time.perf_counter()
    reference_cache.model_fingerprint(trainer.model)
    model_hash = time.perf_counter() - start
    start = time.perf_counter()
    reference_cache.dataset_fingerprint(trainer.train_dataset.remove_columns(list(trainer.reference_columns)))
    dataset_hash = time.perf_counter() - start
    columns = {c: list(trainer.train_dataset[c]) for c in trainer.reference_columns}
    result = {
        "reference_pass_s": timings["train"],
        "model_hash_s": model_hash,
        "dataset_hash_s": dataset_hash,
        "reference_batches": len(batches),
        "columns_sha": hashlib.sha256(json.dumps(columns).encode()).hexdigest(),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    print("RESULT " + json.dumps(result))


def hash_scaling(megabytes: int = 512) -> dict[str, float]:
    """Seconds to fingerprint a `megabytes` fp32 model (stacked 2048x2048 layers), in full and by sampled elements
    (what models above `FULL_HASH_BYTES` get), on CPU."""
    import torch

    from llm_trainer.trainer import reference_cache

    layers = max(1, megabytes * 2**20 // (2048 * 2048 * 4))
    model = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)))
    timings = {"model_mb": layers * 2048 * 2048 * 4 / 2**20}
    for mode, limit in (("full_s", 2**62), ("sampled_s", 0)):
        saved, reference_cache.FULL_HASH_BYTES = reference_cache.FULL_HASH_BYTES, limit
        start = time.perf_counter()
        reference_cache.model_fingerprint(model)
        timings[mode] = time.perf_counter() - start
        reference_cache.FULL_HASH_BYTES = saved
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    if options.child:
        child(*options.child, options.rows, options.seq_len)
        return
    import os

    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        build_model(model)
        env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "LLM_TRAINER_CACHE": str(Path(tmp) / "cache"),
        }
        env.pop("LLM_TRAINER_REF_CACHE", None)
        runs = {}
        for run in ("first", "second"):
            command = [sys.executable, __file__, "--rows", str(options.rows), "--seq-len", str(options.seq_len)]
            command += ["--threads", str(options.threads)] if options.threads else []
            command += ["--child", model, str(Path(tmp) / run)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{run} run failed:\n{done.stderr[-4000:]}")
            runs[run] = json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")))
        cache_bytes = sum(p.stat().st_size for p in (Path(tmp) / "cache").rglob("*.safetensors"))
    first, second = runs["first"], runs["second"]
    ratio = second["reference_pass_s"] / first["reference_pass_s"]
    settings = {"rows": options.rows, "seq_len": options.seq_len, "threads": options.threads or "default"}
    print(f"Reference log-prob cache (DPO, {first['parameters'] / 1e6:.1f}M parameters, CPU), {settings}")
    header = "| run    | reference pass (s) | reference batches | model hash (s) | dataset hash (s) |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, r in runs.items():
        print(
            f"| {name:<6} | {r['reference_pass_s']:18.3f} | {r['reference_batches']:17d} | {r['model_hash_s']:14.3f} "
            f"| {r['dataset_hash_s']:16.3f} |"
        )
    same = first["columns_sha"] == second["columns_sha"]
    print(f"second / first: {ratio:.2%} (goal < 5%); columns identical: {same}; cache file: {cache_bytes} bytes")
    scaling = hash_scaling()
    print(
        f"Model fingerprint of a {scaling['model_mb']:.0f} MB fp32 model: full {scaling['full_s']:.2f} s, "
        f"sampled {scaling['sampled_s']:.3f} s"
    )
    summary = {
        "benchmark": "reference_cache",
        "settings": settings,
        "runs": runs,
        "second_over_first": ratio,
        "goal": 0.05,
        "columns_identical": same,
        "cache_bytes": cache_bytes,
        "model_hash_scaling": scaling,
    }
    suffix = f"_t{options.threads}" if options.threads else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"reference_cache{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Asynchronous vs on-policy GRPO on two cores: samples per second, and the reward each reaches.

    python benchmarks/async_grpo.py [--steps 120] [--batch 16] [--completion-length 48]
                                    [--mode batch-async] [--max-staleness 1] [--runners on-policy,async]
                                    [--max-inflight-tasks -1] [--queue-maxsize 1024]

The generation server is a real `llm-trainer vllm-serve --backend transformers` process pinned to core 1
(`taskset -c 1`, `OMP_NUM_THREADS=1`); the trainer is a separate process pinned to core 0
(`os.sched_setaffinity`, `torch.set_num_threads(1)`). So generation and training each have one core, and whatever
the two runners gain can only come from overlapping them. Each runner gets a fresh server on the same saved model.

- **on-policy GRPO**: `GRPOTrainer(use_vllm=True, vllm_mode="server")`. Each step generates on the server, waits,
  trains, then pushes the new weights: one core always idles.
- **async GRPO**: `AsyncGRPOTrainer` with `max_staleness` (default 1) and `weight_sync_mode` (default
  `batch-async`): rollout workers keep the server busy while the trainer trains on rollouts produced at most
  `max_staleness` versions ago, with importance-sampling correction from the server's log-probs.

Same model (a tiny Qwen2 from `llm_trainer.testing.make_tiny_model`, sized so a step's generation and training take
about the same time on one core each), the same prompts, `num_generations=8`, `--batch` completions an optimizer step,
the same number of steps (so the same number of trained-on samples), learning rate, seed and sampling (temperature 1).
The task is countable: the reward is the fraction of a completion's characters that are digits. The shipped tokenizer
splits every digit into its own token (10 of its 668), so a random model scores ~0.01 and the optimum, 1.0, is any
string of digit tokens: one plateau, no local optimum a run can lock into (a letter task has several: tokens with
half or two thirds of their characters the letter).

Measured: samples/s = trained-on samples / wall time of `trainer.train()` (start-up, warm-up and every weight push
included, for both), the ratio async / on-policy (goal >= 1.6x), and the mean reward of the trained-on samples over
the last quarter of the steps (goal: async within 10% of on-policy). Prints a table, writes
`results/async_grpo.json` (`_<mode>`, `_s<max_staleness>` suffixes for non-default settings), with the machine's load
average before and after: on a shared machine other processes crowd onto whichever core is less busy, so the
figures measure that contention as much as the overlap: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from step_report import ENV, RESULTS, emit

MODEL = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
NUM_GENERATIONS = 8
LEARNING_RATE = 3e-3
N_PROMPTS = 64
SEED = 42
RUNNERS = {"on-policy": "on-policy GRPO", "async": "async GRPO"}


def digit_fraction(completions: list[str], **kwargs) -> list[float]:
    """The countable task: the fraction of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def _prompts() -> list[str]:
    return [f"Question {i}: write a sentence." for i in range(N_PROMPTS)]


def _pin_trainer() -> None:
    """Core 0, one torch thread: the trainer's half of the machine."""
    os.sched_setaffinity(0, {0})
    import torch

    torch.set_num_threads(1)


class _Server:
    """`llm-trainer vllm-serve --backend transformers` on core 1 with one thread, a real process on a free port."""

    def __init__(self, model_path: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = ["taskset", "-c", "1", sys.executable, "-m", "llm_trainer.cli", "vllm-serve"]
        command += ["--backend", "transformers", "--model", model_path, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--log_level", "warning"]
        self.process = subprocess.Popen(
            command, env={**ENV, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 180
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm-serve exited with {self.process.returncode}:\n{self.process.stderr.read()}")
            try:
                opener.open(f"{self.url}/health/", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"vllm-serve at {self.url} did not answer /health/ within 180 s") from None
                time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _common(args: argparse.Namespace) -> dict:
    """Settings both trainers share (TRL's field names)."""
    return {
        "output_dir": tempfile.mkdtemp(),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": args.completion_length,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "vllm_server_base_url": args.url,
        "beta": 0.0,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": SEED,
    }


def _wall_timer(marks: dict, step_times: list[float]):
    """A `TrainerCallback` recording when training begins and ends and each optimizer step's wall time."""
    from transformers import TrainerCallback

    class WallTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = time.perf_counter()

    return WallTimer()


def run_on_policy(args: argparse.Namespace) -> tuple[object, dict]:
    from datasets import Dataset

    from llm_trainer import GRPOConfig, GRPOTrainer

    config = GRPOConfig(**_common(args), use_vllm=True, vllm_mode="server", dataloader_pin_memory=False)
    trainer = GRPOTrainer(
        model=args.model_path,
        reward_funcs=digit_fraction,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": _prompts()}),
    )
    timings: dict[str, list[float]] = {"generation_times": [], "weight_sync_times": []}
    generator = trainer.generator
    generator.generate = _timed(generator.generate, timings["generation_times"])
    generator.sync_weights = _timed(generator.sync_weights, timings["weight_sync_times"])
    return trainer, timings


def _timed(fn, sink: list[float]):
    """`fn`, appending the seconds each call takes to `sink`."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return wrapper


def run_async(args: argparse.Namespace) -> tuple[object, dict]:
    from datasets import Dataset

    from llm_trainer.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer
    from llm_trainer.generation.remote import VLLMServerGenerator

    config = AsyncGRPOConfig(
        **_common(args),
        max_staleness=args.max_staleness,
        weight_sync_mode=args.mode,
        weight_sync_steps=1,
        max_inflight_tasks=args.max_inflight_tasks,
        queue_maxsize=args.queue_maxsize,
    )
    trainer = AsyncGRPOTrainer(
        model=args.model_path,
        reward_funcs=digit_fraction,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": _prompts()}),
    )
    timings: dict[str, list[float]] = {"generation_times": [], "batch_times": [], "weight_sync_times": []}
    VLLMServerGenerator.generate = _timed(VLLMServerGenerator.generate, timings["generation_times"])
    trainer.make_batch = _timed(trainer.make_batch, timings["batch_times"])
    trainer._after_optimizer_step = _timed(trainer._after_optimizer_step, timings["weight_sync_times"])
    return trainer, timings


def child(args: argparse.Namespace) -> None:
    _pin_trainer()
    build = run_on_policy if args.child == "on-policy" else run_async
    trainer, extra = build(args)
    marks: dict = {}
    step_times: list[float] = []
    trainer.add_callback(_wall_timer(marks, step_times))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [log for log in trainer.state.log_history if "reward" in log]
    rewards = [log["reward"] for log in logs]
    tail = rewards[-max(1, len(rewards) // 4) :]
    samples = trainer.state.global_step * args.batch
    reached = next(
        (i + 1 for i in range(len(rewards)) if sum(rewards[max(0, i - 4) : i + 1]) / min(i + 1, 5) >= 0.5), None
    )

    def mean_of(key: str) -> float | None:
        values = [log[key] for log in logs if key in log]
        return sum(values) / len(values) if values else None

    emit(
        {
            "steps": trainer.state.global_step,
            "samples": samples,
            "train_wall_s": wall,
            "loop_wall_s": marks.get("end", start + wall) - marks.get("begin", start),
            "samples_per_s": samples / wall,
            "step_times": step_times,
            "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else None,
            "rewards": rewards,
            "reward_first_quarter": sum(rewards[: len(tail)]) / len(tail),
            "reward_last_quarter": sum(tail) / len(tail),
            "steps_to_reward_0.5": reached,
            "mean_completion_length": mean_of("completions/mean_length"),
            "staleness_mean": mean_of("staleness/mean"),
            "staleness_max": max((log["staleness/max"] for log in logs if "staleness/max" in log), default=None),
            "pool_dropped_stale": max(
                (log["pool/dropped_stale"] for log in logs if "pool/dropped_stale" in log), default=None
            ),
            "weight_sync_s_mean": mean_of("perf/weight_sync_s"),
            **extra,
            **{f"median_{k[:-6]}_s": sorted(v)[len(v) // 2] for k, v in extra.items() if k.endswith("_times") and v},
        }
    )


def _run(name: str, args: argparse.Namespace, model_path: str) -> dict:
    server = _Server(model_path)
    try:
        command = [sys.executable, __file__, "--child", name, "--model-path", model_path, "--url", server.url]
        command += ["--steps", str(args.steps), "--batch", str(args.batch)]
        command += ["--completion-length", str(args.completion_length), "--mode", args.mode]
        command += ["--max-staleness", str(args.max_staleness), "--max-inflight-tasks", str(args.max_inflight_tasks)]
        command += ["--queue-maxsize", str(args.queue_maxsize)]
        done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    finally:
        server.stop()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the {RUNNERS[name]} runner failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def table(results: dict) -> str:
    header = (
        "| runner         | steps | samples | wall (s) | samples/s | vs on-policy | median step (s) "
        "| reward first 1/4 | reward last 1/4 | vs on-policy | steps to 0.5 | staleness mean/max | dropped stale |"
    )
    rows = []
    base = results.get("on-policy")
    for name, r in results.items():
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        reward = r["reward_last_quarter"] / base["reward_last_quarter"] if base else float("nan")
        r["samples_per_s_vs_on_policy"], r["reward_vs_on_policy"] = speed, reward
        stale = "-" if r.get("staleness_mean") is None else f"{r['staleness_mean']:.2f} / {r['staleness_max']:g}"
        dropped = "-" if r.get("pool_dropped_stale") is None else f"{r['pool_dropped_stale']:g}"
        rows.append(
            f"| {RUNNERS[name]:<14} | {r['steps']:5d} | {r['samples']:7d} | {r['train_wall_s']:8.1f} "
            f"| {r['samples_per_s']:9.1f} | {speed:11.2f}x | {r['median_step_s']:15.3f} "
            f"| {r['reward_first_quarter']:16.3f} | {r['reward_last_quarter']:15.3f} | {reward:11.2f}x "
            f"| {r['steps_to_reward_0.5'] or '-':>12} | {stale:>18} | {dropped:>13} |"
        )
    rule = "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"
    return "\n".join([header, rule, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per runner")
    parser.add_argument("--batch", type=int, default=16, help="completions an optimizer step (a multiple of 8)")
    parser.add_argument("--completion-length", type=int, default=48, help="max_completion_length")
    parser.add_argument("--mode", default="batch-async", choices=("sync", "fully-async", "batch-async"))
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--max-inflight-tasks", type=int, default=-1, help="async: completions in flight (-1: auto)")
    parser.add_argument("--queue-maxsize", type=int, default=1024, help="async: completions buffered in the pool")
    parser.add_argument("--runners", default="on-policy,async", help="comma-separated: on-policy, async")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < NUM_GENERATIONS or args.batch % NUM_GENERATIONS:
        parser.error(f"--batch must be a positive multiple of num_generations ({NUM_GENERATIONS}), got {args.batch}.")
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if not runners or any(r not in RUNNERS for r in runners):
        parser.error(f"--runners must name some of {', '.join(RUNNERS)}, got {args.runners!r}.")
    if args.build_model:
        from llm_trainer.testing import make_tiny_model

        make_tiny_model(args.build_model, seed=0, **MODEL)
        return
    if args.child:
        return child(args)

    results = {}
    load_before = os.getloadavg()
    if load_before[0] > 2.5:
        print(
            f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other processes share the pinned cores"
        )
    with tempfile.TemporaryDirectory() as model_path:
        subprocess.run([sys.executable, __file__, "--build-model", model_path], env=ENV, check=True)
        for name in runners:
            results[name] = _run(name, args, model_path)
            print(f"{RUNNERS[name]}: {results[name]['samples_per_s']:.1f} samples/s", flush=True)
    settings = {
        "model": MODEL,
        "num_generations": NUM_GENERATIONS,
        "batch": args.batch,
        "steps": args.steps,
        "max_completion_length": args.completion_length,
        "learning_rate": LEARNING_RATE,
        "task": "fraction of completion characters that are digits",
        "weight_sync_mode": args.mode,
        "max_staleness": args.max_staleness,
        "max_inflight_tasks": args.max_inflight_tasks,
        "queue_maxsize": args.queue_maxsize,
        "pinning": "server: taskset -c 1, OMP_NUM_THREADS=1; trainer: sched_setaffinity({0}), 1 torch thread",
    }
    print(table(results))
    base = results.get("on-policy")
    if base and base.get("median_generation_s"):
        generation, push = base["median_generation_s"], base.get("median_weight_sync_s", 0.0)
        training = base["median_step_s"] - generation - push
        bound = base["median_step_s"] / max(generation, training + push)
        base["overlap_bound_vs_on_policy"] = bound
        print(
            f"on-policy step {base['median_step_s']:.3f} s = generation {generation:.3f} + training {training:.3f} "
            f"+ weight push {push:.3f}: perfect overlap would give {bound:.2f}x"
        )
    if "on-policy" in results and "async" in results:
        speed, reward = results["async"]["samples_per_s_vs_on_policy"], results["async"]["reward_vs_on_policy"]
        print(
            f"async / on-policy: {speed:.2f}x samples/s (goal >= 1.6x: {'met' if speed >= 1.6 else 'MISSED'}); "
            f"last-quarter reward {reward:.2f}x of on-policy (goal within 10%: "
            f"{'met' if reward >= 0.9 else 'MISSED'})"
        )
    suffix = (
        (f"_{args.mode}" if args.mode != "batch-async" else "")
        + (f"_s{args.max_staleness}" if args.max_staleness != 1 else "")
        + (f"_inflight{args.max_inflight_tasks}" if args.max_inflight_tasks != -1 else "")
        + (f"_q{args.queue_maxsize}" if args.queue_maxsize != 1024 else "")
    )
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    machine["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    payload = {"benchmark": "async_grpo", **settings, "machine": machine, "results": results}
    out = RESULTS / f"async_grpo{suffix}.json"
    if set(runners) != set(RUNNERS):
        out = RESULTS / f"async_grpo{suffix}_{'_'.join(runners)}.json"
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()

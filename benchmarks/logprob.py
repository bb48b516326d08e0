"""Per-token log-probs through the LM head, forward + backward: time and peak memory, four ways side by side.

    python benchmarks/logprob.py [--quick] [--rounds 2] [--repeats 2] [--out benchmarks/results/logprob.json]

Methods, all from the same `hidden (B, T, H)` and `weight (V, H)` (both requiring grad) and all-valid labels, with
loss `-logp.mean()`:

- `llm_trainer`: `llm_trainer.kernels.token_logprobs(hidden, weight, labels)`;
- `naive`: `(hidden @ weight.T).log_softmax(-1).gather(-1, labels)`;
- `trl_selective`: TRL 1.16's `selective_log_softmax(hidden @ weight.T, labels)` on materialized logits;
- `trl_fused`: TRL 1.16's fused LM head, i.e. the `_ChunkedLogProbFunction` that `add_fused_lm_head` calls, with
  the arguments it passes on CPU (every position, flattened; 32768-column tiles; `outputs=("log_probs",)`), then its
  `masked_fill` of ignored positions. Calling it directly leaves out the model's backbone, which is not measured.

Shapes: tokens in {2048, 8192} (sequences of 1024), hidden 512, vocab in {32000, 151936}, fp32 on CPU.

Every case runs in a fresh subprocess, so no allocator cache or earlier peak leaks between cases. The child builds
the inputs, warms the method up on a tiny shape (library initialisation), hands freed heap back to the OS
(`malloc_trim`), resets the kernel's peak-RSS counter (`5 > /proc/self/clear_refs`) and runs forward + backward:
the peak memory is `VmHWM - VmRSS` around that first run, i.e. everything the method allocates above its inputs,
including the gradients (the same `d weight` and `d hidden` for every method); `--repeats - 1` more runs are only
timed. Each shape runs all methods in turn, `--rounds` times. The table reports each method's fastest run and largest
peak: on a shared machine a burst of load from other processes then hits every method alike, and rarely every run.
The process's CPU time per run (all threads) is recorded as well, being less sensitive to such load than wall time,
and so is the load average.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("llm_trainer", "naive", "trl_selective", "trl_fused")
FULL = {"tokens": (2048, 8192), "vocab": (32000, 151936), "hidden": 512, "seq_len": 1024}
QUICK = {"tokens": (512, 1024), "vocab": (8000,), "hidden": 256, "seq_len": 256}
# Rough peak of the materializing methods, in fp32 logits: logits + log-softmax + their gradients
LOGITS_COPIES = 4


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def _logprobs(method: str):
    """`f(hidden, weight, labels) -> logp` for one method."""
    import torch

    if method == "llm_trainer":
        from llm_trainer.kernels import token_logprobs

        return token_logprobs
    if method == "naive":
        return lambda h, w, y: (h @ w.T).log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if method == "trl_selective":
        from trl.trainer.utils import selective_log_softmax

        return lambda h, w, y: selective_log_softmax(h @ w.T, y)
    if method == "trl_fused":
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        def fused(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = y != -100
            args = (1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
            logp = _ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, y.clamp(min=0).flatten(), *args)
            return logp[0].view(mask.shape).masked_fill(~mask, 0)

        return fused
    raise ValueError(method)


def _inputs(tokens: int, vocab: int, hidden: int, seq_len: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    batch = max(1, tokens // seq_len)
    h = torch.randn(batch, tokens // batch, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (batch, tokens // batch), generator=gen)
    return h, w, y


def child(spec: dict) -> dict:
    """Peak memory of one forward + backward of one method at one shape, and the times of `repeats` of them."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    f = _logprobs(spec["method"])

    def step(h, w, y) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        (-f(h, w, y).mean()).backward()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        h.grad = w.grad = None
        return elapsed, cpu

    step(*_inputs(64, 1000, spec["hidden"], 64))
    h, w, y = _inputs(spec["tokens"], spec["vocab"], spec["hidden"], spec["seq_len"])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base_kb = _status_kb("VmRSS")
    runs = [step(h, w, y)]
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    runs += [step(h, w, y) for _ in range(spec["repeats"] - 1)]
    return {"times_s": [wall for wall, _ in runs], "cpu_times_s": [cpu for _, cpu in runs], "peak_mb": peak_mb}


def run_case(spec: dict) -> dict:
    """One round of one case in a subprocess: `{"times_s", "cpu_times_s", "peak_mb"}` or `{"skipped": why}`."""
    needed = LOGITS_COPIES * spec["tokens"] * spec["vocab"] * 4
    if spec["method"] in ("naive", "trl_selective") and needed > 0.9 * _available_bytes():
        return {"skipped": f"needs ~{needed / 2**30:.0f} GiB, {_available_bytes() / 2**30:.0f} GiB available"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_shape(shape: dict, methods: list[str], rounds: int) -> list[dict]:
    """All methods at one shape, interleaved over `rounds`: fastest run, largest peak."""
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for _ in range(rounds):
        for method in methods:
            if not any("skipped" in run for run in runs[method]):
                runs[method].append(run_case({"method": method, **shape}))
                print(json.dumps({"method": method, **shape, **runs[method][-1]}), flush=True)
    results = []
    for method, method_runs in runs.items():
        skipped = [run["skipped"] for run in method_runs if "skipped" in run]
        if skipped:
            results.append({"method": method, **shape, "skipped": skipped[0]})
            continue
        times = [t for run in method_runs for t in run["times_s"]]
        cpu_times = [t for run in method_runs for t in run["cpu_times_s"]]
        peak = max(run["peak_mb"] for run in method_runs)
        best = {"time_s": min(times), "cpu_time_s": min(cpu_times), "peak_mb": peak}
        results.append({"method": method, **shape, **best, "times_s": times, "cpu_times_s": cpu_times})
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def summarize(results: list[dict]) -> list[dict]:
    """Per shape: llm_trainer against naive and TRL's fused head, and the three targets."""
    rows = []
    for tokens, vocab in dict.fromkeys((r["tokens"], r["vocab"]) for r in results):
        by = {r["method"]: r for r in results if (r["tokens"], r["vocab"]) == (tokens, vocab) and "skipped" not in r}
        ours, naive, fused = by.get("llm_trainer"), by.get("naive"), by.get("trl_fused")
        verdicts = {}
        if ours and naive:
            verdicts["memory <= naive / 8"] = ours["peak_mb"] <= naive["peak_mb"] / 8
        if ours and fused:
            verdicts["memory <= trl_fused"] = ours["peak_mb"] <= fused["peak_mb"]
            verdicts["time <= 0.8 x trl_fused"] = ours["time_s"] <= 0.8 * fused["time_s"]
        rows.append({"tokens": tokens, "vocab": vocab, "targets": verdicts})
    return rows


def print_table(results: list[dict], summary: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="token log-probs, forward + backward (fp32, CPU)")
    columns = ("tokens", "vocab", "method", "time (s)", "CPU time (s)", "peak extra (MB)", "time / naive")
    for column in (*columns, "mem / naive"):
        table.add_column(column, justify="right")
    table.add_column("time / trl_fused", justify="right")
    table.add_column("mem / trl_fused", justify="right")
    for r in results:
        same = {x["method"]: x for x in results if (x["tokens"], x["vocab"]) == (r["tokens"], r["vocab"])}
        if "skipped" in r:
            table.add_row(str(r["tokens"]), str(r["vocab"]), r["method"], "skipped", "-", r["skipped"], *"----")
            continue
        naive, fused = same.get("naive", {}), same.get("trl_fused", {})
        table.add_row(
            str(r["tokens"]),
            str(r["vocab"]),
            r["method"],
            f"{r['time_s']:.3f}",
            f"{r['cpu_time_s']:.3f}",
            f"{r['peak_mb']:.0f}",
            _ratio(r["time_s"], naive.get("time_s")),
            _ratio(r["peak_mb"], naive.get("peak_mb")),
            _ratio(r["time_s"], fused.get("time_s")),
            _ratio(r["peak_mb"], fused.get("peak_mb")),
        )
    console = Console(width=150)
    console.print(table)
    for row in summary:
        marks = ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in row["targets"].items())
        console.print(f"{row['tokens']} x {row['vocab']}: {marks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per case, methods interleaved")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per subprocess (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, help="JSON output (default: results/logprob[_quick].json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    shapes = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    results = []
    for tokens in shapes["tokens"]:
        for vocab in shapes["vocab"]:
            shape = {"tokens": tokens, "vocab": vocab, "hidden": shapes["hidden"], "seq_len": shapes["seq_len"]}
            shape.update(repeats=args.repeats, threads=args.threads)
            results += run_shape(shape, args.methods, args.rounds)
    summary = summarize(results)
    print_table(results, summary)

    import torch
    import trl

    out = args.out or RESULTS / ("logprob_quick.json" if args.quick else "logprob.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    out.write_text(json.dumps({"machine": machine, "results": results, "summary": summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

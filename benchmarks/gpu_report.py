"""The log-prob benchmark on a CUDA GPU, with its GEMM floor printed beside ours.

    python benchmarks/gpu_report.py [--quick] [--repeats 5] [--dtype bfloat16] [--out benchmarks/results/gpu_logprob.json]

Per-token log-probs through the LM head, forward + backward, from `hidden (B, T, H)` and `weight (V, H)` (both
requiring grad) with all-valid labels and loss `-logp.mean()`, for the methods of `benchmarks/logprob.py`
(`llm_trainer`: the fused head, Triton back end on CUDA; `naive`; `trl_selective`; `trl_fused`) plus:

- `llm_trainer_torch`: the fused head with its chunked PyTorch back end (`backend="torch"`);
- `gemm_floor`: the bare head GEMMs alone, `logits = hidden @ weight.T` forward and its two backward GEMMs
  (`d hidden = g @ weight`, `d weight = g.T @ hidden`, with `g` a constant upstream gradient). Any method that
  computes exact log-probs through the head does at least this arithmetic, so `ours / floor` is the overhead of
  everything else (the softmax reductions, tiling, recomputation of the logits in the backward).

Shapes: tokens in {2048, 8192}, hidden 4096, vocab in {32000, 151936}. Times are CUDA-event medians of `--repeats`
runs after 2 warm-ups; memory is `torch.cuda.max_memory_allocated` above the inputs during one run (the gradients
of `hidden` and `weight` included, the same for every method). A method that runs out of memory is recorded as such.

Without CUDA it prints that and writes nothing (exit 0), so `benchmarks/gpu.sh` completes on a CPU machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("gemm_floor", "llm_trainer", "llm_trainer_torch", "naive", "trl_selective", "trl_fused")
FULL = {"tokens": (2048, 8192), "vocab": (32000, 151936), "hidden": 4096, "seq_len": 1024}
QUICK = {"tokens": (1024,), "vocab": (32000,), "hidden": 1024, "seq_len": 512}


def _cpu_logprob_module():
    """`benchmarks/logprob.py`, for its method definitions (one source for both benchmarks)."""
    spec = importlib.util.spec_from_file_location("logprob_benchmark", HERE / "logprob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def method_fn(method: str):
    """`step(hidden, weight, labels)`: one forward + backward of `method`."""
    import torch

    if method == "gemm_floor":

        def floor(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
            logits = h @ w.T
            logits.backward(torch.full_like(logits, 1.0 / logits.numel()))

        return floor
    if method == "llm_trainer_torch":
        from llm_trainer.kernels import token_logprobs

        f = lambda h, w, y: token_logprobs(h, w, y, backend="torch")  # noqa: E731
    else:
        f = _cpu_logprob_module()._logprobs(method)

    def step(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        (-f(h, w, y).mean()).backward()

    return step


def run_case(method: str, tokens: int, vocab: int, hidden: int, seq_len: int, dtype_name: str, repeats: int) -> dict:
    """Median time and peak memory of one method at one shape, or `{"skipped": why}`."""
    import torch

    dtype = getattr(torch, dtype_name)
    torch.cuda.empty_cache()
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = max(1, tokens // seq_len)
    h = torch.randn(batch, tokens // batch, hidden, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (batch, tokens // batch), device="cuda", generator=gen)
    try:
        step = method_fn(method)
    except ImportError as error:
        return {"skipped": f"not installed: {error}"}
    try:
        for _ in range(2):
            step(h, w, y)
            h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(h, w, y)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
            h.grad = w.grad = None
        peak = torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        return {"skipped": "CUDA out of memory"}
    finally:
        del h, w, y
        torch.cuda.empty_cache()
    return {"median_s": statistics.median(times), "times_s": times, "peak_mb": peak / 2**20}


def _table(results: list[dict]) -> str:
    lines = [
        f"{'tokens':>7} {'vocab':>7} {'method':<18} {'median ms':>10} {'x floor':>8} {'peak MiB':>9}",
    ]
    floors = {(r["tokens"], r["vocab"]): r.get("median_s") for r in results if r["method"] == "gemm_floor"}
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['tokens']:>7} {r['vocab']:>7} {r['method']:<18} {'skipped: ' + r['skipped']}")
            continue
        floor = floors.get((r["tokens"], r["vocab"]))
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        lines.append(
            f"{r['tokens']:>7} {r['vocab']:>7} {r['method']:<18} {r['median_s'] * 1e3:>10.2f} {ratio:>8} "
            f"{r['peak_mb']:>9.0f}"
        )
    return "\n".join(lines)


def summarise_tests(junit: Path, out: Path) -> int:
    """The GPU suite's outcome per test from pytest's JUnit XML, with the device it ran on (written only when a
    CUDA device ran the suite: a CPU run skips everything and must not overwrite real figures)."""
    import xml.etree.ElementTree as ET

    import torch

    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device; the GPU suite was skipped and no test summary was written.")
        return 0
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "")[:500]
                break
        else:
            message = ""
        tests.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "time_s": float(case.get("time", 0)),
                "message": message,
            }
        )
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "counts": counts, "tests": tests}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"GPU suite: {counts}; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (the median is reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, help="JSON output (default: results/gpu_logprob[_quick]_<dtype>.json)")
    parser.add_argument("--junit", type=Path, help="only summarise this pytest JUnit XML into results/gpu_tests.json")
    args = parser.parse_args(argv)

    import torch

    if args.junit:
        return summarise_tests(args.junit, RESULTS / "gpu_tests.json")
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device; the GPU log-prob benchmark was skipped and nothing was written.")
        return 0
    shapes = QUICK if args.quick else FULL
    results = []
    for tokens in shapes["tokens"]:
        for vocab in shapes["vocab"]:
            for method in args.methods:
                case = run_case(method, tokens, vocab, shapes["hidden"], shapes["seq_len"], args.dtype, args.repeats)
                results.append({"method": method, "tokens": tokens, "vocab": vocab, **case})
                print(_table(results[-1:]).splitlines()[-1], flush=True)
    table = _table(results)
    print("\n" + table)
    out = args.out or RESULTS / f"gpu_logprob{'_quick' if args.quick else ''}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "hidden": shapes["hidden"],
        "repeats": args.repeats,
        "results": results,
        "table": table.splitlines(),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

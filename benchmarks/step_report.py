"""What the training-step benchmarks share: memory readings, running one runner per subprocess, the table, the JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path

# where `report` writes; BENCHMARK_RESULTS_DIR moves it (smoke runs that must not overwrite the recorded figures)
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS_DIR") or Path(__file__).parent / "results")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
RUNNERS = ("minimal loop", "llm_trainer", "trl 1.16")
LOAD_AT_START = os.getloadavg()  # the machine's 1/5/15-minute load when the benchmark (the parent process) started


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """Print a child's result (with its peak RSS) for `run_child` to read."""
    print("RESULT " + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def step_timer(times: list[float]):
    """A `TrainerCallback` appending each optimizer step's wall time to `times` (transformers imported here, in the
    runner's process)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    return StepTimer()


def run_child(command: list[str]) -> dict:
    """Run one runner in a fresh process and return its result, with the median step time added."""
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, check=True).stdout
    result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    times = sorted(result["step_times"])
    result["median_step_s"] = times[len(times) // 2]
    return result


def report(benchmark: str, title: str, results: dict, settings: dict, suffix: str) -> None:
    """Add the ratios to `results`, print the side-by-side table and loss parity, write `results/<benchmark><suffix>.json`."""
    minimal, trl = results["minimal loop"], results["trl 1.16"]
    rows = []
    for name, r in results.items():
        r["time_vs_minimal"] = r["median_step_s"] / minimal["median_step_s"]
        r["time_vs_trl"] = r["median_step_s"] / trl["median_step_s"]
        r["peak_rss_vs_minimal"] = r["peak_rss_mb"] / minimal["peak_rss_mb"]
        r["peak_rss_vs_trl"] = r["peak_rss_mb"] / trl["peak_rss_mb"]
        extra = r["peak_rss_mb"] - r["base_rss_mb"]
        rows.append(
            f"| {name:<12} | {r['median_step_s']:8.3f} | {r['time_vs_minimal']:9.2f}x | {r['time_vs_trl']:5.2f}x "
            f"| {r['peak_rss_mb']:13.0f} | {r['peak_rss_vs_minimal']:9.2f}x | {r['peak_rss_vs_trl']:5.2f}x "
            f"| {extra:16.0f} |"
        )
    header = (
        "| runner       | step (s) | vs minimal | vs TRL | peak RSS (MB) | vs minimal | vs TRL | above setup (MB) |"
    )
    print(f"{title}, {', '.join(f'{k}={v}' for k, v in settings.items())}")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    print("\n".join(rows))
    ours, theirs = results["llm_trainer"].get("losses"), trl.get("losses")
    if ours and theirs:
        worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        print(f"loss parity llm_trainer vs TRL over {len(ours)} steps: max relative difference {worst:.2e}")
        results["loss_max_rel_diff_vs_trl"] = worst
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_start": LOAD_AT_START,
        "load_avg_end": os.getloadavg(),
    }
    print(
        "machine load (1/5/15 min): at start "
        + "/".join(f"{x:.2f}" for x in LOAD_AT_START)
        + ", at end "
        + "/".join(f"{x:.2f}" for x in machine["load_avg_end"])
    )
    payload = {"benchmark": benchmark, **settings, "machine": machine, "results": results}
    (RESULTS / f"{benchmark}{suffix}.json").write_text(json.dumps(payload, indent=2))

"""Issue 16's checks, read from the results JSONs that `benchmarks/perf16.sh` writes: each ratio, its target, pass/miss.

    python benchmarks/perf16_summary.py [--results-dir benchmarks/results] [--before 170c7e1] [--rss-tolerance 0.03]

Checks (llm_trainer's median step time and peak RSS over TRL 1.16's or the minimal loop's, measured side by side in
one run of each benchmark):

- GRPO defaults (`grpo_step.json`) and 64 completions a step (`grpo_step_b64.json`): step <= 0.40x TRL, generation
  <= 0.6x TRL;
- long-prompt GRPO (`grpo_step_long-prompt.json`): step <= 0.15x TRL;
- variable-length DPO (`dpo_step_varlen.json`): step <= 0.10x TRL, peak RSS <= 0.3x TRL;
- SFT (`sft_step.json`): step <= 1.0x the minimal loop;
- no benchmark's peak memory grows: llm_trainer's peak RSS against the same file at git revision `--before` (default
  170c7e1, the last commit before issue 16's work), allowing `--rss-tolerance` (3%: run-to-run noise of `ru_maxrss`).

Also prints every runner's figures, each benchmark's machine load (1/5/15-minute averages at its start and end) and
the load now, and writes `perf16_summary.json` next to the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = {
    "grpo_step.json": "GRPO default (8 completions a step)",
    "grpo_step_b64.json": "GRPO 64 completions a step",
    "grpo_step_long-prompt.json": "GRPO long prompt (512 + 64, 16 a step)",
    "dpo_step.json": "DPO default (8 pairs, 256 tokens)",
    "dpo_step_varlen.json": "DPO variable length (16-512 each)",
    "sft_step.json": "SFT default (8 x 256)",
}
# (file, what, the ratio's key in llm_trainer's results, target): llm_trainer's ratio must be <= target
TARGETS = [
    ("grpo_step.json", "step vs TRL", "time_vs_trl", 0.40),
    ("grpo_step.json", "generation vs TRL", "generation_vs_trl", 0.60),
    ("grpo_step_b64.json", "step vs TRL", "time_vs_trl", 0.40),
    ("grpo_step_b64.json", "generation vs TRL", "generation_vs_trl", 0.60),
    ("grpo_step_long-prompt.json", "step vs TRL", "time_vs_trl", 0.15),
    ("dpo_step_varlen.json", "step vs TRL", "time_vs_trl", 0.10),
    ("dpo_step_varlen.json", "peak RSS vs TRL", "peak_rss_vs_trl", 0.30),
    ("sft_step.json", "step vs minimal loop", "time_vs_minimal", 1.00),
]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _before(revision: str, name: str) -> dict | None:
    """`benchmarks/results/<name>` as committed at `revision`, or None where it did not exist."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:benchmarks/results/{name}"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def _load_text(machine: dict) -> str:
    start, end = machine.get("load_avg_start"), machine.get("load_avg_end")
    if start is None or end is None:
        return "not recorded"
    return "/".join(f"{x:.2f}" for x in start) + " -> " + "/".join(f"{x:.2f}" for x in end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--before", default="170c7e1", help="git revision whose results are the memory baseline")
    parser.add_argument("--rss-tolerance", type=float, default=0.03, help="peak-RSS growth counted as noise")
    args = parser.parse_args()
    runs = {name: _load(args.results_dir / name) for name in BENCHMARKS}

    print(
        "| benchmark | runner | step (s) | vs minimal | vs TRL | generation (s) | vs TRL | training (s) | vs TRL "
        "| peak RSS (MB) | vs minimal | vs TRL |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, title in BENCHMARKS.items():
        run = runs[name]
        if run is None:
            print(f"| {title} | not run | | | | | | | | | | |")
            continue
        for runner, r in run["results"].items():
            if not isinstance(r, dict):
                continue
            gen = (
                f"{r['median_generation_s']:.3f} | {r['generation_vs_trl']:.2f}x | {r['median_training_s']:.3f} "
                f"| {r['training_vs_trl']:.2f}x"
                if "median_generation_s" in r
                else "- | - | - | -"
            )
            print(
                f"| {title} | {runner} | {r['median_step_s']:.3f} | {r['time_vs_minimal']:.2f}x "
                f"| {r['time_vs_trl']:.2f}x | {gen} | {r['peak_rss_mb']:.0f} | {r['peak_rss_vs_minimal']:.2f}x "
                f"| {r['peak_rss_vs_trl']:.2f}x |"
            )

    checks = []
    print("\n| benchmark | check | llm_trainer | target | result |")
    print("|---|---|---|---|---|")
    for name, what, key, target in TARGETS:
        run = runs[name]
        value = run["results"]["llm_trainer"].get(key) if run else None
        verdict = "not run" if value is None else ("pass" if value <= target else f"MISS by {value / target:.2f}x")
        checks.append({"file": name, "check": what, "value": value, "target": target, "result": verdict})
        shown = "-" if value is None else f"{value:.3f}x"
        print(f"| {BENCHMARKS[name]} | {what} | {shown} | <= {target:.2f}x | {verdict} |")
    for name, title in BENCHMARKS.items():
        run, old = runs[name], _before(args.before, name)
        if run is None or old is None:
            continue
        now, then = run["results"]["llm_trainer"]["peak_rss_mb"], old["results"]["llm_trainer"]["peak_rss_mb"]
        growth = now / then - 1
        verdict = "pass" if growth <= args.rss_tolerance else f"MISS: +{growth:.1%}"
        checks.append(
            {"file": name, "check": f"peak RSS vs {args.before}", "value": now, "before": then, "result": verdict}
        )
        print(
            f"| {title} | peak RSS vs {args.before} | {now:.0f} MB | <= {then:.0f} MB (+{args.rss_tolerance:.0%}) "
            f"| {verdict} ({growth:+.1%}) |"
        )

    print("\nmachine load (1/5/15 min) at each benchmark's start -> end:")
    for name, title in BENCHMARKS.items():
        if runs[name] is not None:
            print(f"  {title}: {_load_text(runs[name]['machine'])}")
    now = os.getloadavg()
    print("  now: " + "/".join(f"{x:.2f}" for x in now) + f" on {os.cpu_count()} CPUs")
    summary = {"checks": checks, "load_avg_at_summary": now, "before": args.before}
    (args.results_dir / "perf16_summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

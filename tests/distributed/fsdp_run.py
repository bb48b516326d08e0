"""Launch a script on several CPU processes (gloo) and collect what each rank reports, for the FSDP2 tests.

In the test: `results = run_torchrun(SCRIPT, [arg, ...])` (plain `torchrun --nproc_per_node 2`) or
`run_torchrun(SCRIPT, args, accelerate_config=fsdp2_config(tmp_path))` (as TRL users launch:
`accelerate launch --config_file fsdp2.yaml`). In the launched script: call `fsdp_shim.enable_cpu_fsdp2()` first,
train, then `write_result({...})` on every rank (JSON-serialisable); `finish()` ends the process without the
interpreter teardown that gloo's background threads can hang. `results[r]` is rank r's dict.

`tests/distributed` is on the launched scripts' `PYTHONPATH`, so they `from fsdp_shim import ...` and
`from fsdp_run import write_result`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_ENV = "FSDP_RUN_RESULTS"

# Variables a surrounding launcher (or an earlier test) may have left that would confuse a fresh process group.
_STALE = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
)


def fsdp2_config(
    directory: str | os.PathLike,
    num_processes: int = 2,
    state_dict_type: str = "FULL_STATE_DICT",
    reshard_after_forward: bool = True,
    cpu_ram_efficient_loading: bool = True,
) -> str:
    """Write an Accelerate FSDP2 launch config (the shape of the usual `fsdp2.yaml`, fp32 for CPU) and return its
    path."""
    lines = [
        "compute_environment: LOCAL_MACHINE",
        "distributed_type: FSDP",
        "fsdp_config:",
        "  fsdp_version: 2",
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
        f"  fsdp_state_dict_type: {state_dict_type}",
        f"  fsdp_reshard_after_forward: {str(reshard_after_forward).lower()}",
        f"  fsdp_cpu_ram_efficient_loading: {str(cpu_ram_efficient_loading).lower()}",
        "  fsdp_offload_params: false",
        "  fsdp_activation_checkpointing: false",
        "machine_rank: 0",
        "mixed_precision: 'no'",
        "num_machines: 1",
        f"num_processes: {num_processes}",
        "rdzv_backend: static",
        "same_network: true",
        "use_cpu: false",
    ]
    path = Path(directory) / f"fsdp2_{state_dict_type.lower()}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _free_port() -> int:
    from llm_trainer.trainer.utils import free_port

    return free_port()


def run_torchrun(
    script: str | os.PathLike,
    args: list[str] | tuple[str, ...] = (),
    nproc: int = 2,
    accelerate_config: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> list[dict[str, Any]]:
    """Run `script args` on `nproc` local processes and return each rank's `write_result` dict, by rank.

    `torchrun --nproc_per_node nproc` by default; with `accelerate_config`, `accelerate launch --config_file ...
    --num_processes nproc` instead. One thread per process (`OMP_NUM_THREADS=1`) unless `env` says otherwise.
    Raises AssertionError with the tail of the output when the launch fails or a rank wrote nothing.
    """
    results_dir = Path(tempfile.mkdtemp(prefix="fsdp_run_"))
    full_env = dict(os.environ)
    for name in _STALE:
        full_env.pop(name, None)
    python_path = [str(HERE), str(HERE.parent.parent)]
    if full_env.get("PYTHONPATH"):
        python_path.append(full_env["PYTHONPATH"])
    full_env.update(
        {
            "OMP_NUM_THREADS": "1",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(python_path),
            RESULTS_ENV: str(results_dir),
        }
    )
    full_env.update(env or {})
    port = str(_free_port())
    if accelerate_config is None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_port", port]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
        launcher += ["--num_processes", str(nproc), "--main_process_port", port]
    command = [*launcher, str(script), *map(str, args)]
    done = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
    output = (done.stdout[-2000:] + "\n" + done.stderr[-6000:]).strip()
    assert done.returncode == 0, f"launch failed ({done.returncode}): {' '.join(command)}\n{output}"
    results = []
    for rank in range(nproc):
        path = results_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result\n{output}"
        results.append(json.loads(path.read_text()))
    return results


def write_result(result: dict[str, Any]) -> None:
    """In a launched script: record this rank's result for `run_torchrun` (one call per rank; the last wins)."""
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        raise RuntimeError(f"{RESULTS_ENV} is not set: launch this script with fsdp_run.run_torchrun")
    rank = int(os.environ.get("RANK", "0"))
    path = Path(directory) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def finish() -> None:
    """End a launched script: wait for every rank, flush, and exit without the interpreter teardown (gloo's and
    the trainers' background threads can hang or abort it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""TRL's `trl.distributed`: `DistributedBackend`, which hides whether DeepSpeed ZeRO or FSDP is in use behind context
managers that do nothing where they are not needed; and `warn_if_not_sharded`, which says so loudly when FSDP or ZeRO
was asked for but the run trains unsharded (Accelerate falls back to DDP on a CPU-only machine without a word)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "DistributedBackend",
    "ShardingFallbackWarning",
    "requested_sharding",
    "sharding_fallback",
    "warn_if_not_sharded",
]


class DistributedBackend:
    """The distributed back end of an `accelerate.Accelerator`, read once from its state.

    `zero_stage` is the DeepSpeed ZeRO stage (0 without DeepSpeed) and `fsdp_version` the FSDP version (None
    without FSDP).

    Example:
        ```python
        backend = DistributedBackend(accelerator)
        with backend.gather_params(list(model.parameters())):
            model.merge_adapter()
        ```
    """

    def __init__(self, accelerator: Any):
        deepspeed_plugin = accelerator.state.deepspeed_plugin
        fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
        self.zero_stage: int = deepspeed_plugin.zero_stage if deepspeed_plugin else 0
        self.fsdp_version: int | None = getattr(fsdp_plugin, "fsdp_version", None) if fsdp_plugin else None

    @property
    def is_zero3(self) -> bool:
        """Whether DeepSpeed ZeRO stage 3 (sharded parameters) is active."""
        return self.zero_stage == 3

    @property
    def is_fsdp(self) -> bool:
        """Whether FSDP, of any version, is active."""
        return self.fsdp_version is not None

    @contextlib.contextmanager
    def gather_params(self, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Under ZeRO-3, gather `params` whole for the block (a collective: every process must enter); else nothing."""
        if not self.is_zero3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield

    @contextlib.contextmanager
    def summon_full_params(self, module: torch.nn.Module, **kwargs: Any) -> Iterator[None]:
        """Under FSDP v1, materialize `module`'s full parameters for the block (`kwargs` go to
        `FullyShardedDataParallel.summon_full_params`, e.g. `writeback=False`); FSDP v2 parameters are always
        accessible, so elsewhere this does nothing."""
        if self.fsdp_version != 1:
            yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(module, **kwargs):
            yield


class ShardingFallbackWarning(UserWarning):
    """FSDP or DeepSpeed ZeRO was asked for, but the run trains unsharded (or the launched processes train alone)."""


_WARNED: set[str] = set()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def requested_sharding(args: Any = None) -> list[str]:
    """What asked for sharded training, in words: FSDP or ZeRO in the training arguments (`fsdp`, `deepspeed`) or
    in the `accelerate launch` config (which reaches the process as `ACCELERATE_USE_FSDP` /
    `ACCELERATE_USE_DEEPSPEED`). Empty when nothing did."""
    asked = []
    if args is not None and getattr(args, "fsdp", None):
        asked.append(f"FSDP (TrainingArguments.fsdp={args.fsdp!r})")
    if args is not None and getattr(args, "deepspeed", None):
        source = args.deepspeed if isinstance(args.deepspeed, str) else "a dict"
        asked.append(f"DeepSpeed ZeRO (TrainingArguments.deepspeed={source})")
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        asked.append(f"FSDP{version if version != '1' else ''} (the accelerate config: ACCELERATE_USE_FSDP=true)")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        asked.append(
            f"DeepSpeed ZeRO{f'-{stage}' if stage else ''} (the accelerate config: ACCELERATE_USE_DEEPSPEED=true)"
        )
    return asked


def sharding_fallback(accelerator: Any, args: Any = None) -> str | None:
    """Why this run does not train the way it was launched to, or None when it does.

    Two silent fallbacks are caught: FSDP or ZeRO requested (`requested_sharding`) while the accelerator is neither
    FSDP nor DeepSpeed (Accelerate on a CPU-only machine wraps the model in DDP instead), and a run launched as
    several processes (`WORLD_SIZE` > 1) whose accelerator sees one process, so every process trains alone on the
    whole dataset (a CPU-only machine whose processes were not told to use the CPU).
    """
    from accelerate.utils import DistributedType

    distributed_type = accelerator.distributed_type
    num_processes = accelerator.num_processes
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    on_gpu = torch.cuda.is_available()
    use_cpu = bool(getattr(args, "use_cpu", False)) or _env_flag("ACCELERATE_USE_CPU")
    problems = []
    if world_size > 1 and num_processes == 1:
        why = (
            "no GPU was found and the processes were not told to use the CPU (set ACCELERATE_USE_CPU=true or "
            "--use_cpu, as `llm-trainer --accelerate_config` does on a CPU-only machine)"
            if not on_gpu and not use_cpu
            else "Accelerate did not join the launched process group"
        )
        problems.append(
            f"This run was launched as {world_size} processes, but each one trains ALONE on the whole dataset "
            f"(Accelerate: {distributed_type}, 1 process): {why}."
        )
    asked = requested_sharding(args)
    if asked and distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if distributed_type == DistributedType.NO:
            instead = "a single unsharded process"
        elif distributed_type == DistributedType.MULTI_CPU:
            instead = f"plain DDP over gloo on {num_processes} CPU processes, each holding the whole model"
        else:
            instead = f"{distributed_type} on {num_processes} processes, each holding the whole model"
        if not on_gpu or use_cpu:
            why = (
                "the run is on CPU (" + ("use_cpu is set" if use_cpu and on_gpu else "no GPU") + "): Accelerate "
                "applies FSDP and DeepSpeed only on accelerators and falls back to DDP without a word"
            )
        else:
            why = "Accelerate did not enable the requested plugin (check the accelerate config and launcher)"
        problems.append(
            f"{' and '.join(asked)} was requested, but this run is NOT sharded: it trains with {instead}. Why: {why}. "
            "Memory per process is that of an unsharded run; run on GPUs to shard, or drop the FSDP/DeepSpeed "
            "request."
        )
    return " ".join(problems) or None


def warn_if_not_sharded(accelerator: Any, args: Any = None) -> str | None:
    """Warn (`ShardingFallbackWarning`, once per process, from the local main process) when the run does not train
    as it was asked to (`sharding_fallback`); return the message, or None. Called where the trainer has built its
    accelerator, before any training."""
    message = sharding_fallback(accelerator, args)
    if message is None or message in _WARNED:
        return message
    _WARNED.add(message)
    if accelerator.is_local_main_process:
        warnings.warn(message, ShardingFallbackWarning, stacklevel=2)
    return message

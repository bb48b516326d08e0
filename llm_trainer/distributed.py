"""TRL's `trl.distributed`: `DistributedBackend`, which hides whether DeepSpeed ZeRO or FSDP is in use behind context
managers that do nothing where they are not needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["DistributedBackend"]


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

"""Test-only: make Accelerate's real FSDP2 path run on CPU (gloo) in a `torchrun` process.

Accelerate picks FSDP only when its process state is a multi-accelerator one (`MULTI_GPU`, `MULTI_XPU`, ...); on a
CPU-only machine it labels a `torchrun` process `MULTI_CPU` and then ignores the FSDP plugin: the model is wrapped
in DDP and trains unsharded, without a word. `torch.distributed.fsdp.fully_shard` itself runs on CPU with gloo, so
the tests relabel the state — and nothing else — just before `AcceleratorState` reads it: `MULTI_CPU` becomes
`MULTI_GPU` when an FSDP plugin was given (or `ACCELERATE_USE_FSDP=true`). The device, the backend (gloo) and the
process group stay the CPU ones; Accelerate then records `DistributedType.FSDP` and `fsdp2_prepare_model` calls
`fully_shard`, so parameters become DTensors sharded over the ranks.

Never imported by the library: the library must warn, not pretend, when a user's FSDP request falls back to DDP.
"""

from __future__ import annotations

import inspect
import os

import torch

_ENABLED = False


def _wants_fsdp(plugin) -> bool:
    return plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def enable_cpu_fsdp2() -> None:
    """Patch `accelerate.state.AcceleratorState.__init__` (idempotent) so an FSDP request on CPU runs FSDP.

    Call it at the top of a `torchrun`'d script, before the Trainer (or its `TrainingArguments`' device setup)
    builds the Accelerator.
    """
    global _ENABLED
    if _ENABLED:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_partial_init = PartialState.__init__

    def partial_init(self, cpu: bool = False, **kwargs):
        # On a machine without CUDA, an FSDP request under a launcher would otherwise give DistributedType.NO
        # (`use_cpu=False`: no accelerator found, so no process group at all)
        if _wants_fsdp(None) and not torch.cuda.is_available():
            cpu = True
        original_partial_init(self, cpu, **kwargs)

    PartialState.__init__ = partial_init
    original_init = AcceleratorState.__init__

    signature = inspect.signature(original_init)

    def init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        if _wants_fsdp(bound.get("fsdp_plugin")) and not torch.cuda.is_available():
            if not PartialState._shared_state:  # a bare `Accelerator()`: set up the CPU process group first
                PartialState(True, **bound.get("kwargs", {}))
            shared = PartialState._shared_state
            if shared.get("distributed_type") == DistributedType.MULTI_CPU:
                shared["distributed_type"] = DistributedType.MULTI_GPU
        original_init(self, *args, **kwargs)

    AcceleratorState.__init__ = init
    _ENABLED = True


def sharded_parameters(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (local elements, full elements)} of every parameter that is a DTensor."""
    from torch.distributed.tensor import DTensor

    return {
        name: (param.to_local().numel(), param.numel())
        for name, param in model.named_parameters()
        if isinstance(param, DTensor)
    }


def assert_sharded(model: torch.nn.Module) -> None:
    """Assert that this rank holds every parameter of `model` as a DTensor sharded (`Shard`) over all the ranks, with
    a local shard smaller than the full parameter wherever its first dimension (FSDP2 shards dim 0) has at least one
    row per rank, so that the model is sharded, not replicated as under DDP."""
    from torch.distributed.tensor import DTensor, Shard

    world = torch.distributed.get_world_size()
    assert world > 1, "assert_sharded needs more than one process"
    params = dict(model.named_parameters())
    assert params, "the model has no parameters"
    plain = [name for name, param in params.items() if not isinstance(param, DTensor)]
    assert not plain, f"parameters are plain tensors, not FSDP2 DTensors (DDP fallback?): {plain[:5]}"
    replicated = [
        name
        for name, param in params.items()
        if param.device_mesh.size() != world or not any(isinstance(p, Shard) for p in param.placements)
    ]
    assert not replicated, f"parameters are not sharded over the {world} ranks: {replicated[:5]}"
    whole = [
        name
        for name, param in params.items()
        if param.dim() and param.shape[0] >= world and param.to_local().numel() >= param.numel()
    ]
    assert not whole, f"parameters are held whole on this rank: {whole[:5]}"

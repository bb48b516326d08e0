"""The policy's full weights under its checkpoint's names, read one tensor at a time for a generation back end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Wrapper prefixes that appear in parameter names but not in the checkpoint a back end loaded.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def iter_named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every parameter of `model`, as a vLLM engine or a served model names them.

    Handles DDP/DeepSpeed wrappers and `torch.compile`, gathers DeepSpeed ZeRO-3 and FSDP shards (a collective:
    every process must iterate), and with PEFT yields the base weights with the adapter merged in, without the
    adapter's own tensors. Each tensor is only valid until the next one is requested: copy it to keep it.
    """
    from accelerate.utils import extract_model_from_parallel, is_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel

    summon = contextlib.nullcontext()
    if isinstance(model, FullyShardedDataParallel):
        summon = FullyShardedDataParallel.summon_full_params(model, writeback=False)
    else:
        model = extract_model_from_parallel(model, keep_torch_compile=False)
    with summon:
        if is_peft_model(model):
            yield from _merged_peft_weights(model)
        else:
            for name, param in model.named_parameters():
                with _gathered([param]):
                    yield _clean(name), _full(param)


def _merged_peft_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    # Merging needs every weight at once, so ZeRO-3 gathers the whole model here.
    with _gathered(list(model.parameters())):
        model.merge_adapter()
        try:
            for name, param in model.named_parameters():
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if model.prefix in name or "original_module" in name:  # adapter tensors, already merged
                    continue
                yield _clean(name.replace("modules_to_save.default.", "")), _full(param)
        finally:
            model.unmerge_adapter()


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):  # FSDP2 shards
        return param.full_tensor().detach()
    return param.detach()


def _gathered(params: list[torch.Tensor]):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for the duration of the context (a no-op otherwise)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)

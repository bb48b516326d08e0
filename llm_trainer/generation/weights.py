"""The policy's full weights under its checkpoint's names, read one tensor at a time for a generation back end."""

from __future__ import annotations

import contextlib
import enum
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
            yield from _module_by_module(model)


def _module_by_module(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter once (a tied weight under its first name, as `named_parameters` gives it), gathered once:
    ZeRO-3 partitions one module at a time (its own parameters in one `GatheredParameters`, released before the
    next module), FSDP2 DTensors one `full_tensor()` all-gather each. Every process visits the same parameters in
    the same order, so the collectives match."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        with _gathered([p for _, p in own]):
            for name, param in own:
                yield _clean(f"{prefix}.{name}" if prefix else name), _full(param)


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


def lora_adapter_state(model) -> tuple[dict[str, torch.Tensor], dict]:
    """The active LoRA adapter of a peft `model` as `(tensors, config)`, for an adapter-only weight update.

    `tensors` are CPU copies named as `peft.get_peft_model_state_dict` names them (without the adapter name);
    `config` is the adapter's `LoraConfig` as JSON-ready fields. Wrappers are removed and ZeRO-3 shards gathered
    (a collective: every process must call it). A model without a LoRA adapter is refused with the alternative.
    """
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if not is_peft_model(model):
        raise ValueError(
            f"update_lora_adapter needs a peft model with a LoRA adapter, got {type(model).__name__}; send full "
            "weights with update_weights(iter_named_weights(model)) instead."
        )
    from peft import get_peft_model_state_dict

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    peft_config = model.peft_config[name]
    if str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).upper() != "LORA":
        raise ValueError(
            f"update_lora_adapter serves LoRA adapters only; adapter {name!r} is {peft_config.peft_type}. Send merged "
            "weights with update_weights(iter_named_weights(model)) instead."
        )
    with _gathered(list(model.parameters())):
        tensors = {
            key: _full(value).to("cpu", copy=True).contiguous()
            for key, value in get_peft_model_state_dict(model, adapter_name=name).items()
        }
    return tensors, _json_ready(peft_config.to_dict())


def _json_ready(value):
    """`LoraConfig.to_dict()` values as JSON types: sets become sorted lists, enums their values."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_ready(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, enum.Enum):
        return _json_ready(value.value)
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)

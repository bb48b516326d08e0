"""Model plumbing at TRL's path (`trl.models.utils`): unwrapping a wrapped policy for `generate`, preparing frozen
models (reference, teacher, reward) for DeepSpeed or FSDP, and pausing gradient checkpointing.

DeepSpeed is optional: it is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from ..modeling import create_reference_model

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "add_hooks",
    "create_reference_model",
    "disable_gradient_checkpointing",
    "get_all_parameters",
    "iter_params",
    "prepare_deepspeed",
    "prepare_fsdp",
    "remove_hooks",
    "unwrap_model_for_generation",
]

_DEEPSPEED_HINT = "DeepSpeed is not installed; install it with `pip install deepspeed` (it needs a CUDA toolkit)."


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(_DEEPSPEED_HINT) from error
    return deepspeed


def _is_zero3(accelerator: Accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3 hooks
def get_all_parameters(sub_module: nn.Module, recurse: bool = False) -> Iterator[tuple[str, nn.Parameter]]:
    """`(name, parameter)` pairs of a ZeRO-3 module: its own and the external ones DeepSpeed registered on it."""
    return itertools.chain(sub_module.named_parameters(recurse=recurse), sub_module.ds_external_parameters())


def iter_params(module: nn.Module, recurse: bool = False) -> list[nn.Parameter]:
    """The parameters of `get_all_parameters`, without their names."""
    return [param for _, param in get_all_parameters(module, recurse)]


def _zero_offload(model: Any) -> Any:
    """The object holding a DeepSpeed engine's ZeRO parameter hooks (None before the first optimizer exists)."""
    if not hasattr(model, "optimizer"):  # no optimizer yet: nothing is hooked
        return None
    optimizer = model.optimizer
    if optimizer is None:
        raise RuntimeError("The model optimizer is None, which is not yet supported.")
    return getattr(optimizer, "parameter_offload", optimizer)


def remove_hooks(model: Any) -> None:
    """Detach ZeRO-3's parameter-fetching hooks from a DeepSpeed engine, so gathered weights stay in place while
    `generate` runs many forwards (re-attach them with `add_hooks`)."""
    offload = _zero_offload(model)
    if offload is None:
        return
    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks = []
    offload.backward_hooks = []


def add_hooks(model: Any) -> None:
    """Re-attach the hooks `remove_hooks` detached, dropping ZeRO-3's recorded module-fetch trace first (the
    generation forwards made it stale)."""
    offload = _zero_offload(model)
    if offload is None:
        return
    coordinator = getattr(offload, "param_coordinator", None)  # ZeRO stage 3 only
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    offload._register_deepspeed_module(offload.module)


# ----------------------------------------------------------------------------------------------------- generation
@contextlib.contextmanager
def disable_gradient_checkpointing(
    model: nn.Module, gradient_checkpointing_kwargs: dict | None = None
) -> Iterator[None]:
    """Turn gradient checkpointing off for the duration of the context (generation recomputes nothing and caches
    keys and values instead), then back on with `gradient_checkpointing_kwargs` if it was on."""
    # transformers 5 renamed these to `activation_checkpointing_*` (the old names warn); other modules keep the old.
    was_enabled = getattr(model, "is_activation_checkpointing", None)
    if was_enabled is None:
        was_enabled = getattr(model, "is_gradient_checkpointing", False)
    if was_enabled:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    try:
        yield
    finally:
        if was_enabled:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)


@contextlib.contextmanager
def _generation_config_overridden(model: nn.Module, generation_kwargs: dict | None) -> Iterator[None]:
    """`model.generation_config` updated with `generation_kwargs` for the duration of the context (the saved config,
    which is what inference later uses, is left as it was)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(target, "generation_config", None)
    if not generation_kwargs or original is None:
        yield
        return
    from transformers import GenerationConfig

    overridden = GenerationConfig.from_dict(original.to_dict())
    overridden.update(**generation_kwargs)
    target.generation_config = overridden
    try:
        yield
    finally:
        target.generation_config = original


@contextlib.contextmanager
def unwrap_model_for_generation(
    model: nn.Module,
    accelerator: Accelerator,
    gather_deepspeed3_params: bool = True,
    generation_kwargs: dict | None = None,
    gradient_checkpointing_kwargs: dict | None = None,
) -> Iterator[nn.Module]:
    """Yield `model` ready for `generate`: unwrapped from DDP/DeepSpeed/FSDP wrappers, with gradient checkpointing
    paused, and under DeepSpeed ZeRO-3 with its full weights gathered (unless `gather_deepspeed3_params=False`, which
    saves memory but fetches the shards layer by layer at every forward).

    `generation_kwargs` update the model's `generation_config` inside the context only; everything is restored on
    exit, errors included.
    """
    unwrapped = accelerator.unwrap_model(model)
    with (
        disable_gradient_checkpointing(unwrapped, gradient_checkpointing_kwargs),
        _generation_config_overridden(unwrapped, generation_kwargs),
    ):
        if _is_zero3(accelerator) and gather_deepspeed3_params:
            deepspeed = _import_deepspeed()
            with deepspeed.zero.GatheredParameters(model.parameters()):
                remove_hooks(model)
                try:
                    yield accelerator.unwrap_model(model)
                finally:
                    add_hooks(model)
        else:
            yield unwrapped


# -------------------------------------------------------------------------------------- frozen models, distributed
def prepare_deepspeed(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Wrap a frozen model (reference, teacher, reward) in a DeepSpeed inference engine, in eval mode.

    Uses the accelerator's DeepSpeed config without its optimizer, scheduler and optimizer offload (nothing is trained
    here). Under ZeRO-3 the model is sharded like the policy, with bucket sizes fitted to its hidden size; under any
    other stage it is replicated whole on every device (ZeRO disabled).
    """
    deepspeed = _import_deepspeed()
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config["zero_optimization"]
    stage = zero["stage"]
    if model is not None and stage == 3:
        model_config = model.config
        hidden_sizes = getattr(model_config, "hidden_sizes", None)
        hidden = max(hidden_sizes) if hidden_sizes else getattr(model_config, "hidden_size", None)
        if hidden is not None:
            config.update(
                {
                    "zero_optimization.reduce_bucket_size": hidden * hidden,
                    "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
                    "zero_optimization.stage3_prefetch_bucket_size": 0.9 * hidden * hidden,
                }
            )
    for training_only in ("optimizer", "scheduler"):
        config.pop(training_only, None)
    zero.pop("offload_optimizer", None)
    if stage != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def prepare_fsdp(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Shard a frozen model with the accelerator's FSDP plugin (FSDP1 wrapper or FSDP2 `fully_shard`), in eval mode.

    A model that is already FSDP-wrapped (manual wrapping) is only switched to eval mode.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, (FSDP, FSDPModule)):
        model.eval()
        return model
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1:
        plugin.set_auto_wrap_policy(model)
        model = FSDP(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            use_orig_params=plugin.use_orig_params,
            param_init_fn=plugin.param_init_fn,
            ignored_modules=plugin.ignored_modules,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        )
    elif plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import get_parameters_from_modules
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None:
            mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        fully_shard(
            model,
            reshard_after_forward=plugin.reshard_after_forward,
            offload_policy=plugin.cpu_offload,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            mesh=mesh,
            ignored_params=get_parameters_from_modules(plugin.ignored_modules, model, accelerator.device),
        )
    else:
        raise ValueError(f"FSDP version {plugin.fsdp_version} is not supported.")
    model.eval()
    return model

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
    "zero3_copy",
    "zero3_layerwise_gathered",
]

_DEEPSPEED_HINT = (
    "DeepSpeed is not installed; install it with `pip install llm-trainer[deepspeed]` (or `pip install deepspeed`). "
    "Without a GPU, DeepSpeed runs on CPU with `DS_ACCELERATOR=cpu` and `ddp_backend='gloo'`."
)


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


def _is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _engine_hooked(model: nn.Module) -> bool:
    """Whether a DeepSpeed engine registered its ZeRO-3 fetch hooks on `model` or on a module inside it (the engine
    itself, or its `module`): it numbers every module it hooks."""
    return any(isinstance(getattr(module, "ds_id", None), int) for module in model.modules())


@contextlib.contextmanager
def zero3_layerwise_gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Let forwards run on a ZeRO-3-partitioned model that no DeepSpeed engine wraps yet (loaded under
    `zero.Init`, e.g. the policy while `precompute_ref_log_probs=True` scores the dataset in `__init__`, before
    `accelerator.prepare`): without the engine's hooks its weights are empty shards and a forward fails with
    "'weight' must be 2-D".

    Inside the context each module gathers its own parameters just before its forward and releases them just after,
    so at most one module's weights are whole at a time, as under the engine. For forwards without backward
    (`torch.no_grad`). Every process must run the same forwards (the gathers are collectives). A no-op for a model
    with no partitioned parameters or one an engine already hooks.
    """
    if _engine_hooked(model) or not any(_is_partitioned(p) for p in model.parameters()):
        yield model
        return
    deepspeed = _import_deepspeed()
    open_contexts: dict[int, list[Any]] = {}
    handles = []

    def before(module: nn.Module, *_: Any) -> None:
        own = [
            p
            for p in module.parameters(recurse=False)
            if _is_partitioned(p) and p.ds_status.name == "NOT_AVAILABLE"  # not gathered by an outer module
        ]
        if own:
            context = deepspeed.zero.GatheredParameters(own)
            context.__enter__()
            open_contexts.setdefault(id(module), []).append(context)

    def after(module: nn.Module, *_: Any) -> None:
        stack = open_contexts.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after, always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_contexts.values():
            while stack:
                stack.pop().__exit__(None, None, None)


_ZERO3_BUILD_CONFIG = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


def zero3_copy(model: nn.Module) -> nn.Module:
    """A frozen copy (eval mode, no gradients) of a ZeRO-3-partitioned model, itself partitioned: the reference
    model of DPO, KTO or GRPO's KL term when the policy was loaded under `zero.Init`.

    `copy.deepcopy` (what `create_reference_model` does) copies only each process's empty shard views and DeepSpeed's
    bookkeeping, and the copy then fails inside DeepSpeed (`param.ds_status == AVAILABLE` asserts). Here the copy is
    built from the config under `zero.Init` (partitioned from the start) and filled one module at a time, each
    module's weights gathered from the source and into the copy, so never more than one layer is whole. A collective:
    every process must call it. A model with no partitioned parameters is deep-copied.
    """
    if not any(_is_partitioned(p) for p in model.parameters()):
        return create_reference_model(model)
    import torch

    deepspeed = _import_deepspeed()
    if hasattr(model, "get_base_model"):
        raise ValueError(
            "zero3_copy copies a plain transformers model; for a PEFT policy use its adapter-disabled base as the "
            "reference instead (no copy needed)."
        )
    dtype = next(p for p in model.parameters() if _is_partitioned(p)).ds_tensor.dtype
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    # transformers builds the model under `zero.Init` (and initialises the partitioned weights) when ZeRO-3 is on,
    # as it is inside a trainer; outside one, say so for the duration of the build.
    zero3_on = None if is_deepspeed_zero3_enabled() else HfDeepSpeedConfig(_ZERO3_BUILD_CONFIG)
    try:
        copy_model = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    finally:
        del zero3_on
    copy_modules = dict(copy_model.named_modules())
    done: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            target = copy_modules[name]
            pairs = [
                (source, getattr(target, key))
                for key, source in module.named_parameters(recurse=False)
                if id(source) not in done
            ]
            done.update(id(source) for source, _ in pairs)
            for key, buffer in module.named_buffers(recurse=False):  # not partitioned: plain copies
                target_buffer = getattr(target, key, None)
                if isinstance(target_buffer, torch.Tensor) and target_buffer.shape == buffer.shape:
                    target_buffer.copy_(buffer)
            if pairs:
                with deepspeed.zero.GatheredParameters([p for pair in pairs for p in pair], modifier_rank=0):
                    for source, destination in pairs:
                        destination.data.copy_(source.data)
    if getattr(model, "generation_config", None) is not None:
        copy_model.generation_config = copy.deepcopy(model.generation_config)
    return copy_model.eval().requires_grad_(False)


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
    here). Under ZeRO-3 the model is partitioned like the policy, with bucket sizes fitted to its hidden size, and its
    forwards gather one module at a time (every process must run them); under any other stage it is replicated whole
    on every device (ZeRO disabled). Values still `"auto"` (the trainer fills them only when it builds the policy's
    engine, after `__init__`) are resolved here: batch sizes from the accelerator, precision from its mixed-precision
    setting, the rest left to DeepSpeed's defaults.
    """
    deepspeed = _import_deepspeed()
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for training_only in ("optimizer", "scheduler"):
        config.pop(training_only, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    stage = zero.get("stage", 0)
    if stage == 3:
        model_config = getattr(model, "config", None)
        hidden_sizes = getattr(model_config, "hidden_sizes", None)
        hidden = max(hidden_sizes) if hidden_sizes else getattr(model_config, "hidden_size", None)
        if hidden is not None:
            fitted = {
                "reduce_bucket_size": hidden * hidden,
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            }
            zero.update({key: value for key, value in fitted.items() if zero.get(key, "auto") == "auto"})
    else:
        zero["stage"] = 0
    _resolve_auto(config, accelerator)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _resolve_auto(config: dict, accelerator: Accelerator) -> None:
    """Replace the `"auto"` values of a DeepSpeed config in place (see `prepare_deepspeed`)."""
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if micro == "auto":
        micro = config["train_micro_batch_size_per_gpu"] = 1
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation == "auto":
        accumulation = config["gradient_accumulation_steps"] = 1
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = micro * accumulation * accelerator.num_processes
    precision = str(getattr(accelerator.state, "mixed_precision", "no"))
    for key, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key]["enabled"] = wanted

    def drop_auto(section: dict) -> None:
        for key in [key for key, value in section.items() if value == "auto"]:
            del section[key]
        for value in section.values():
            if isinstance(value, dict):
                drop_auto(value)

    drop_auto(config)


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

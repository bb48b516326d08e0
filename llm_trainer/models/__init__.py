"""Model helpers at TRL's paths (`trl.models`): reference copies, unwrapping for generation, DeepSpeed/FSDP
preparation of frozen models, activation offloading and selective activation checkpointing."""

from .._lazy import lazy_exports

_EXPORTS = {
    "activation_offloading": ["get_act_offloading_ctx_manager"],
    "selective_activation_checkpointing": ["enable_selective_activation_checkpointing"],
    "utils": ["create_reference_model", "prepare_deepspeed", "prepare_fsdp", "unwrap_model_for_generation"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, submodules=True)

"""Selective activation checkpointing at TRL's path (`trl.models.selective_activation_checkpointing`).

Full gradient checkpointing reruns every op of a layer in the backward pass, attention included. Keeping the
attention output instead (one hidden-state-sized tensor per layer) removes the most expensive recomputation at long
context while still recomputing everything else. The choice is made per op through torch's selective checkpointing
policy, in eager mode (no `torch.compile`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["enable_selective_activation_checkpointing"]

# torch's attention kernels (flash, memory-efficient, cuDNN, CPU); a build lacks the ones it was not compiled with.
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def _attention_overloads() -> frozenset:
    """The default overloads of the attention ops this torch build has."""
    packets = (getattr(torch.ops.aten, name, None) for name in _ATTENTION_OPS)
    return frozenset(packet.default for packet in packets if packet is not None)


def _save_attention_policy(attention: frozenset) -> Callable[..., CheckpointPolicy]:
    """A checkpoint policy keeping the outputs of `attention` ops and of flash-attn's kernels (registered under
    generated namespaces, so matched by name), and recomputing every other op."""

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in attention or "flash_attn" in str(op):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_selective_activation_checkpointing(model: nn.Module) -> None:
    """Make `model`'s gradient checkpointing selective: attention outputs are saved, everything else recomputed.

    Replaces `model.gradient_checkpointing_enable` (on this instance) by one that adds the selective policy as
    `context_fn` and forces `use_reentrant=False` (the policy needs non-reentrant checkpointing), so every later
    enable call, by a trainer or by PEFT's preparation, gets it. A `"selective"` key in the kwargs (the config switch
    turning this on) is dropped before they reach torch. Calling it again on the same model does nothing.

    A PEFT model is handled through its base model: `Trainer` enables checkpointing on the innermost model (the PEFT
    wrapper forwards the call), so wrapping the PEFT wrapper's method would silently leave checkpointing full.
    """
    if is_peft_model(model):
        model = model.get_base_model()
    original = model.gradient_checkpointing_enable
    if getattr(original, "_is_sac_wrapped", False):
        return
    context_fn = functools.partial(
        create_selective_checkpoint_contexts, _save_attention_policy(_attention_overloads())
    )

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> Any:
        checkpoint_kwargs = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items() if k != "selective"}
        checkpoint_kwargs.update(use_reentrant=False, context_fn=context_fn)
        return original(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    gradient_checkpointing_enable._is_sac_wrapped = True
    model.gradient_checkpointing_enable = gradient_checkpointing_enable

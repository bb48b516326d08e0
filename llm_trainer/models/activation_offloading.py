"""Activation offloading at TRL's path (`trl.models.activation_offloading`).

The tensors autograd saves during the forward pass (activations) are copied from the accelerator to CPU memory as
they are saved, and copied back when the backward pass needs them, trading transfer time for accelerator memory.
`OffloadActivations` does this through `torch.autograd.graph.saved_tensors_hooks`; `NoOpManager` opts a region out;
`get_act_offloading_ctx_manager` builds one for a model, leaving its output head's activations in place (they are
needed right back by the loss).

Only tensors on the accelerator are moved: on a CPU-only machine every activation already lives in CPU memory, so the
manager keeps each one as it is (the bookkeeping still runs, and results are identical).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

logger = logging.getLogger(__name__)

__all__ = ["NoOpManager", "OffloadActivations", "get_act_offloading_ctx_manager"]

# TorchAO float8 training tensors are already compact; moving them would cost more than it saves.
_FP8_TENSOR_TYPES = ("Float8TrainingTensor", "ScaledMMConfig", "LinearMMConfig")
# Warn when pinned host copies push the machine's RAM use above this percentage.
_HOST_MEMORY_WARN_PCT = 60


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 `DTensor`, or the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor) if type(tensor).__name__ == "DTensor" else tensor


def _get_unique_tensor_key(tensor: torch.Tensor) -> tuple:
    """`(address of the tensor's first element in its storage, dtype)`: equal for tensors viewing the same memory,
    so a storage already being offloaded is not offloaded twice. Falls back to the Python id when the storage is not
    accessible."""
    local = _local(tensor)
    try:
        address = local.untyped_storage().data_ptr() + local.storage_offset()
    except (RuntimeError, AttributeError):
        address = id(local)
    return (address, local.dtype)


def _current_accelerator() -> str | None:
    """The accelerator's device type (`"cuda"`, `"xpu"`, `"npu"`, ...), or None on a CPU-only machine."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None and torch.cuda.is_available():
        return "cuda"
    return None if accelerator is None else accelerator.type


class OffloadActivations(saved_tensors_hooks):
    """Context manager: activations saved for backward while it is active are kept in CPU memory until needed.

    Args:
        use_pin_memory: put the CPU copies in pinned (page-locked) memory, which copies back faster but is a scarcer
            resource. Ignored on a CPU-only machine.
        use_streams: copy on a side stream of the accelerator so transfers overlap computation. The last
            `max_fwd_stash_size` offloaded activations stay alive on the accelerator until their copy is done (a
            backward that needs one of them sooner uses it directly). Ignored on a CPU-only machine.
        min_offload_size: tensors smaller than this many bytes are not worth a transfer and stay where they are.
        max_fwd_stash_size: see `use_streams`; at least 1.

    Parameters and buffers (and any tensor sharing storage with a parameter registered through
    `update_model_params`) are never moved. `tracker` maps each saved tensor's id to `(tensor or its CPU copy,
    offloaded, stride, storage_offset, shape)`; the last three are set only for tensors with broadcast (zero)
    strides, whose underlying storage is copied instead of the materialized view.

    Raises:
        ValueError: if `use_streams` and `max_fwd_stash_size < 1`.
    """

    def __init__(
        self,
        use_pin_memory: bool = True,
        use_streams: bool = True,
        min_offload_size: int = 1024,
        max_fwd_stash_size: int = 5,
    ) -> None:
        if use_streams and max_fwd_stash_size < 1:
            raise ValueError(f"max_fwd_stash_size should be at least 1 but is {max_fwd_stash_size}")
        self.accelerator_type = _current_accelerator()
        on_accelerator = self.accelerator_type is not None
        self.device_module = torch.get_device_module(self.accelerator_type) if on_accelerator else None
        self.use_streams = use_streams and on_accelerator
        self.use_pin_memory = use_pin_memory and on_accelerator
        self.min_tensor_size_bytes = min_offload_size
        self.max_fwd_stash_size = max_fwd_stash_size
        self.param_storages: set[int] = set()
        if self.use_streams:
            self.s1 = self.device_module.Stream()  # the copy stream
        self._reset()
        self.is_first_forward_pass = True  # the host-memory check runs once
        super().__init__(self._pack, self._unpack)

    # ------------------------------------------------------------------------------------------------ state
    def _reset(self) -> None:
        self.tracker: dict[int, tuple] = {}
        self.storage_to_tensor_id: dict[tuple, int] = {}
        self._storage_key_by_tensor_id: dict[int, tuple] = {}
        self.tensor_id = 0
        self.is_first_forward_call = True
        self.is_first_backward_call = True
        self.fwd_stash: dict[int, tuple[torch.Tensor, Any]] = {}  # id -> (accelerator tensor, copy-done event)

    @property
    def s0(self) -> Any:
        """The compute stream, read at each use (FSDP2 and checkpoint recomputation may switch streams)."""
        return self.device_module.current_stream()

    def update_model_params(self, model: nn.Module) -> None:
        """Record the storages of `model`'s parameters, so tensors sharing them (e.g. FSDP's unsharded weights, which
        are not `nn.Parameter`s) are never offloaded."""
        storages = set()
        for param in model.parameters():
            try:
                address = _local(param).untyped_storage().data_ptr()
            except RuntimeError:  # no local storage (a shard held elsewhere, float8 weights)
                continue
            if address:
                storages.add(address)
        self.param_storages = storages

    def _track_storage(self, key: tuple, tensor_id: int) -> None:
        self.storage_to_tensor_id[key] = tensor_id
        self._storage_key_by_tensor_id[tensor_id] = key

    def _release_storage(self, tensor_id: int) -> None:
        key = self._storage_key_by_tensor_id.pop(tensor_id, None)
        if key is not None and self.storage_to_tensor_id.get(key) == tensor_id:
            del self.storage_to_tensor_id[key]

    def _reap_forward_stash(self, keep_after: int) -> None:
        """Drop stashed accelerator tensors with ids up to `keep_after`, once their copy to CPU has finished."""
        for tensor_id in [i for i in self.fwd_stash if i <= keep_after]:
            _, done = self.fwd_stash.pop(tensor_id)
            self.s0.wait_event(done)
            self._release_storage(tensor_id)

    def _should_offload(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != self.accelerator_type:
            return False
        if tensor.element_size() * tensor.nelement() < self.min_tensor_size_bytes:
            return False
        if isinstance(tensor, nn.Parameter) or (hasattr(nn, "Buffer") and isinstance(tensor, nn.Buffer)):
            return False
        if type(tensor).__name__ in _FP8_TENSOR_TYPES:
            return False
        try:
            return _local(tensor).untyped_storage().data_ptr() not in self.param_storages
        except (RuntimeError, AttributeError):
            return True

    # -------------------------------------------------------------------------------------------- the hooks
    def _pack(self, tensor: torch.Tensor) -> int:
        if self.is_first_forward_call:
            if self.tracker:
                raise ValueError("Backward pass should have cleared tracker of all tensors")
            self.is_first_forward_call = False
            self.is_first_backward_call = True
            self.storage_to_tensor_id, self._storage_key_by_tensor_id = {}, {}
        self.tensor_id += 1
        tensor_id = self.tensor_id
        key = _get_unique_tensor_key(tensor)
        if self.use_streams and key in self.storage_to_tensor_id:  # a view of a tensor being offloaded: keep it
            self.tracker[tensor_id] = (tensor, False, None, None, None)
            self._track_storage(key, tensor_id)
            return tensor_id
        if not self._should_offload(tensor):
            self.tracker[tensor_id] = (tensor, False, None, None, None)
            return tensor_id

        broadcast = 0 in tensor.stride()
        if not broadcast and (tensor.storage_offset() != 0 or not tensor.is_contiguous()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # copy only what the view shows
        if self.use_streams:
            self._reap_forward_stash(keep_after=tensor_id - self.max_fwd_stash_size)
            self.s1.wait_stream(self.s0)
        stream = self.device_module.stream(self.s1) if self.use_streams else contextlib.nullcontext()
        with stream:
            if broadcast:  # copy the storage the expanded view reads, not the materialized view
                flat = torch.as_strided(tensor, (tensor.untyped_storage().size() // tensor.element_size(),), (1,), 0)
                host = torch.empty(flat.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.use_pin_memory)
                host.copy_(flat, non_blocking=True)
                self.tracker[tensor_id] = (host, True, tensor.stride(), tensor.storage_offset(), tensor.shape)
            else:
                host = torch.empty_like(tensor, device="cpu", pin_memory=self.use_pin_memory)
                host.copy_(tensor, non_blocking=True)
                self.tracker[tensor_id] = (host, True, None, None, None)
        if self.use_streams:
            self.fwd_stash[tensor_id] = (tensor, self.s1.record_event())
            self._track_storage(key, tensor_id)
        return tensor_id

    def _unpack(self, tensor_id: int) -> torch.Tensor:
        if self.is_first_backward_call:
            self.is_first_backward_call = False
            if self.is_first_forward_pass:
                self.is_first_forward_pass = False
                if self.use_pin_memory:
                    _warn_if_host_memory_high()
        if tensor_id not in self.tracker:
            raise ValueError(f"Untracked tensor with id {tensor_id}")
        stored, offloaded, stride, offset, shape = self.tracker.pop(tensor_id)
        if offloaded:
            if tensor_id in self.fwd_stash:  # still on the accelerator: use it once its copy has finished
                stored, done = self.fwd_stash.pop(tensor_id)
                self.s0.wait_event(done)
            else:
                stored = self._bring_back(stored, stride, offset, shape)
        self._release_storage(tensor_id)
        if not self.tracker:  # every saved tensor came back: the next pack starts a new forward
            self.is_first_forward_call = True
        return stored

    def _bring_back(self, host: torch.Tensor, stride: Any, offset: Any, shape: Any) -> torch.Tensor:
        """Copy `host` back to the accelerator (on the copy stream, which the compute stream then waits for)."""
        stream = self.device_module.stream(self.s1) if self.use_streams else contextlib.nullcontext()
        with stream:
            restored = host.to(self.accelerator_type, non_blocking=True)
            if stride is not None:
                restored = torch.as_strided(restored, shape, stride, offset)
        if self.use_streams:
            self.s0.wait_stream(self.s1)
            # Allocated on the copy stream, used on the compute stream: the allocator must wait for the latter.
            restored.record_stream(self.s0)
        return restored

    # ------------------------------------------------------------------------------------ context protocol
    def __enter__(self) -> OffloadActivations:
        # Whatever is still tracked belongs to graph branches whose backward never ran: drop it.
        self._reset()
        if "bitsandbytes" in sys.modules and self.device_module is not None:
            self.device_module.empty_cache()  # bitsandbytes' dequantization buffers otherwise pile up
        super().__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.use_streams:
                self.s0.synchronize()
                self.s1.synchronize()
                self.fwd_stash.clear()  # every copy is done: the CPU copies serve the backward
        finally:
            super().__exit__(*exc_info)


class NoOpManager(saved_tensors_hooks):
    """Context manager that keeps saved tensors where they are, overriding an enclosing `OffloadActivations` (only the
    innermost saved-tensor hooks apply)."""

    def __init__(self) -> None:
        super().__init__(_identity, _identity)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _warn_if_host_memory_high() -> None:
    try:
        import psutil
    except ImportError:
        return
    used = psutil.virtual_memory().percent
    if used > _HOST_MEMORY_WARN_PCT:
        logger.warning(
            "Activation offloading: %.0f%% of host memory is in use (above %d%%); pinned copies may exhaust it.",
            used,
            _HOST_MEMORY_WARN_PCT,
        )


def _unwrapped(model: nn.Module) -> nn.Module:
    """`model` without a DDP/DeepSpeed wrapper (`.module`) or a PEFT wrapper (`.base_model`)."""
    if hasattr(model, "module"):
        model = model.module
    if hasattr(model, "base_model") and hasattr(model, "peft_config"):
        model = model.base_model
    return model


def _output_heads(model: nn.Module) -> list[nn.Module]:
    """The module producing `model`'s output (the LM head, or failing that the final norm), by the first of TRL's
    conventions that matches, or none."""
    output = getattr(model, "output", None)
    if output is not None:
        if isinstance(output, nn.Module):
            return [output]
        linear = getattr(output, "linear", None)
        return [linear] if isinstance(linear, nn.Module) else []
    if hasattr(model, "lm_head"):
        return [model.lm_head]
    if hasattr(model, "decoder"):
        decoder = model.decoder
        head = getattr(decoder, "output", None) or getattr(decoder, "lm_head", None)
        return [head] if head is not None else []
    norm = getattr(model, "final_layer_norm", None) or getattr(model, "ln_f", None)
    if norm is not None:
        return [norm]
    head = getattr(model, "head", None)
    return [head] if isinstance(head, nn.Module) else []


def _run_without_offloading(module: nn.Module, manager: NoOpManager) -> None:
    enter: Callable = lambda *_: manager.__enter__()  # noqa: E731
    leave: Callable = lambda *_: manager.__exit__()  # noqa: E731
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def get_act_offloading_ctx_manager(
    model: nn.Module,
    use_pin_memory: bool = True,
    use_streams: bool = True,
    min_offload_size: int = 1024,
    max_fwd_stash_size: int = 5,
    warn_if_no_head: bool = True,
) -> OffloadActivations:
    """An `OffloadActivations` for `model` (arguments as there), with `model`'s parameters excluded and its output
    head, plus any Liger kernel module, run without offloading (hooks on those modules; the head's activations are
    used again right away by the loss, so moving them costs time and saves nothing).

    The head is found as `output` (or `output.linear`), `lm_head`, `decoder.output` / `decoder.lm_head`,
    `final_layer_norm` / `ln_f`, or `head`, looking through DDP and PEFT wrappers. When none is found a warning says
    so, unless `warn_if_no_head=False`.
    """
    manager = OffloadActivations(
        use_pin_memory=use_pin_memory,
        use_streams=use_streams,
        min_offload_size=min_offload_size,
        max_fwd_stash_size=max_fwd_stash_size,
    )
    manager.update_model_params(model)
    opt_out = NoOpManager()
    unwrapped = _unwrapped(model)
    heads = _output_heads(unwrapped)
    if not heads and warn_if_no_head:
        logger.warning(
            "During activation offloading, no output head was detected. If your model has an output head, it will be "
            "offloaded, which usually slows training a lot (its activations are vocabulary-sized). Name it "
            "`model.output` (an nn.Module), or pass `warn_if_no_head=False` to silence this warning."
        )
    liger = [module for name, module in unwrapped.named_modules() if "liger" in name.lower()]
    for module in itertools.chain(heads, liger):
        _run_without_offloading(module, opt_out)
    return manager

"""`llm_trainer.models`: activation offloading, selective checkpointing, unwrapping and distributed helpers."""

import logging
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

import llm_trainer
from llm_trainer import models
from llm_trainer.models import activation_offloading as offloading
from llm_trainer.models.activation_offloading import NoOpManager, OffloadActivations, get_act_offloading_ctx_manager
from llm_trainer.models.selective_activation_checkpointing import (
    _attention_overloads,
    _save_attention_policy,
    enable_selective_activation_checkpointing,
)
from llm_trainer.models.utils import (
    add_hooks,
    disable_gradient_checkpointing,
    prepare_deepspeed,
    prepare_fsdp,
    remove_hooks,
    unwrap_model_for_generation,
)
from llm_trainer.testing import tiny_model_config


def tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config(attention_dropout=0.0)).train()


def loss_and_grads(model: nn.Module, inputs: torch.Tensor, context=None):
    model.zero_grad(set_to_none=True)
    if context is None:
        loss = model(inputs, labels=inputs).loss
    else:
        with context:
            loss = model(inputs, labels=inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        # Identical ops in the same order: only float reassociation could differ, far below the gradients' scale.
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)


def forced_copy(manager: OffloadActivations) -> OffloadActivations:
    """Treat CPU as the device to offload from, so the copy-out / copy-back path runs on a CPU-only machine."""
    manager.accelerator_type = "cpu"
    return manager


INPUTS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------ exports
def test_public_names_at_trl_paths():
    assert set(models.__all__) == {
        "create_reference_model",
        "enable_selective_activation_checkpointing",
        "get_act_offloading_ctx_manager",
        "prepare_deepspeed",
        "prepare_fsdp",
        "unwrap_model_for_generation",
        # the submodules are public attributes too, as in `trl.models`
        "activation_offloading",
        "selective_activation_checkpointing",
        "utils",
    }
    assert models.create_reference_model is llm_trainer.create_reference_model  # re-exported, not a second copy
    assert models.unwrap_model_for_generation is unwrap_model_for_generation


# ------------------------------------------------------------------------------------------ activation offloading
def test_offloading_on_cpu_keeps_activations_in_place_and_changes_nothing():
    model = tiny_lm()
    loss, grads = loss_and_grads(model, INPUTS)
    manager = get_act_offloading_ctx_manager(model)
    assert not manager.use_streams and not manager.use_pin_memory  # no accelerator here
    model.zero_grad(set_to_none=True)
    with manager:
        offloaded_loss = model(INPUTS, labels=INPUTS).loss
    entries = list(manager.tracker.values())
    assert entries and not any(offloaded for _, offloaded, *_ in entries)  # already in CPU memory
    offloaded_loss.backward()
    assert manager.tracker == {}  # every saved tensor was handed back
    assert torch.equal(offloaded_loss.detach(), loss)
    assert_same_grads(grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def test_copy_out_and_back_path_gives_the_same_loss_and_gradients():
    model = tiny_lm()
    loss, grads = loss_and_grads(model, INPUTS)
    manager = forced_copy(get_act_offloading_ctx_manager(model, min_offload_size=0))
    model.zero_grad(set_to_none=True)
    with manager:
        offloaded_loss = model(INPUTS, labels=INPUTS).loss
    copies = [t for t, offloaded, *_ in manager.tracker.values() if offloaded]
    assert len(copies) > 10  # the decoder layers' activations went through host copies
    offloaded_loss.backward()
    assert manager.tracker == {} and manager.is_first_forward_call
    torch.testing.assert_close(offloaded_loss.detach(), loss, rtol=0, atol=0)
    assert_same_grads(grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


class _Scale(torch.autograd.Function):
    """`(a * b).sum()`, saving both inputs exactly as given (views included) for backward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a * b).sum()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a


def test_broadcast_and_offset_views_come_back_with_their_values():
    base = torch.randn(6, 8, requires_grad=True)
    row = torch.randn(1, 8, requires_grad=True)
    manager = forced_copy(OffloadActivations(use_streams=False, min_offload_size=1))
    with manager:
        sliced = base * 1.0  # an activation, saved below as a view with a storage offset
        expanded = (row * 1.0).expand(4, 8)  # zero stride: only the 8 stored values are copied
        loss = _Scale.apply(sliced[2:], expanded)
    host_copies = {t.numel() for t, offloaded, *_ in manager.tracker.values() if offloaded}
    assert 8 in host_copies  # the broadcast tensor's storage, not its 32 materialized elements
    loss.backward()
    torch.testing.assert_close(base.grad[2:], expanded.detach(), rtol=0, atol=0)
    assert torch.all(base.grad[:2] == 0)
    torch.testing.assert_close(row.grad, sliced[2:].detach().sum(0, keepdim=True), rtol=1e-6, atol=1e-5)


def test_small_tensors_and_parameters_are_not_offloaded():
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 1000), nn.Tanh())  # tanh saves its 8000-byte output
    manager = forced_copy(OffloadActivations(use_streams=False, min_offload_size=1000))
    manager.update_model_params(model)
    assert manager.param_storages == {p.untyped_storage().data_ptr() for p in model.parameters()}
    with manager:
        out = model(torch.randn(2, 5))
    kept = [t for t, offloaded, *_ in manager.tracker.values() if not offloaded]
    copied = [t for t, offloaded, *_ in manager.tracker.values() if offloaded]
    assert all(t.element_size() * t.nelement() >= 1000 for t in copied) and copied
    param_ptrs = manager.param_storages
    assert not any(t.untyped_storage().data_ptr() in param_ptrs for t in copied)
    assert any(t.untyped_storage().data_ptr() in param_ptrs for t in kept)  # the weights saved by each Linear
    out.sum().backward()


def test_noop_manager_opts_a_region_out():
    manager = forced_copy(OffloadActivations(use_streams=False, min_offload_size=1))
    x = torch.randn(4, 4, requires_grad=True)
    with manager:
        with NoOpManager():
            y = (x * 2).sin()
        assert manager.tracker == {}
        z = y.cos()
    assert len(manager.tracker) == 1
    z.sum().backward()
    torch.testing.assert_close(x.grad, -torch.sin((x * 2).sin()) * torch.cos(x * 2) * 2)


def test_unused_branches_do_not_accumulate_across_steps():
    model = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    manager = forced_copy(OffloadActivations(use_streams=False, min_offload_size=1))
    counts = []
    for _ in range(3):
        with manager:
            loss, _ = model["used"](torch.randn(4, 8)).sum(), model["unused"](torch.randn(4, 8)).sum()
        loss.backward()
        counts.append(len(manager.tracker))
    assert counts == [counts[0]] * 3 and counts[0] > 0


def test_stash_size_must_be_positive_with_streams():
    with pytest.raises(ValueError, match="max_fwd_stash_size should be at least 1"):
        OffloadActivations(max_fwd_stash_size=0)
    OffloadActivations(use_streams=False, max_fwd_stash_size=0)  # unused without streams


def test_storage_key_identifies_views_of_the_same_memory():
    x = torch.randn(4, 4)
    assert offloading._get_unique_tensor_key(x.view(-1)) == offloading._get_unique_tensor_key(x)
    assert offloading._get_unique_tensor_key(x[1:]) != offloading._get_unique_tensor_key(x)


def test_output_head_runs_without_offloading(caplog):
    model = tiny_lm()
    get_act_offloading_ctx_manager(model)
    assert model.lm_head._forward_pre_hooks and model.lm_head._forward_hooks
    with caplog.at_level(logging.WARNING, logger=offloading.__name__):
        get_act_offloading_ctx_manager(nn.Sequential(nn.Linear(2, 2)))
    assert "no output head was detected" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=offloading.__name__):
        get_act_offloading_ctx_manager(nn.Sequential(nn.Linear(2, 2)), warn_if_no_head=False)
    assert caplog.text == ""


# ------------------------------------------------------------------------------ selective activation checkpointing
def test_policy_saves_attention_and_recomputes_the_rest():
    policy = _save_attention_policy(_attention_overloads())
    from torch.utils.checkpoint import CheckpointPolicy

    assert policy(None, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default) is (
        CheckpointPolicy.MUST_SAVE
    )
    assert policy(None, torch.ops.aten.mm.default) is CheckpointPolicy.PREFER_RECOMPUTE


def test_selective_checkpointing_gives_the_same_gradients():
    model = tiny_lm()
    loss, grads = loss_and_grads(model, INPUTS)
    enable_selective_activation_checkpointing(model)
    wrapper = model.gradient_checkpointing_enable
    enable_selective_activation_checkpointing(model)  # idempotent
    assert model.gradient_checkpointing_enable is wrapper
    # transformers' own entry point, as the Trainer calls it, goes through the wrapper; "selective" is dropped.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"selective": True, "use_reentrant": True})
    assert model.is_activation_checkpointing
    checkpoint_fn = model.model.layers[0]._gradient_checkpointing_func
    assert checkpoint_fn.keywords["use_reentrant"] is False and "context_fn" in checkpoint_fn.keywords
    assert "selective" not in checkpoint_fn.keywords
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, INPUTS)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-6 * loss.abs().item())
    assert_same_grads(grads, checkpointed_grads)


def test_selective_checkpointing_called_on_a_peft_model_reaches_the_base_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_lm(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_selective_activation_checkpointing(model)
    base = model.get_base_model()
    # The Trainer enables checkpointing through the PEFT wrapper, which forwards to the base model's method.
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"selective": True})
    checkpoint_fn = base.model.layers[0]._gradient_checkpointing_func
    assert checkpoint_fn.keywords["use_reentrant"] is False and "context_fn" in checkpoint_fn.keywords
    assert "selective" not in checkpoint_fn.keywords


# ------------------------------------------------------------------------------------------------------- utils
def test_disable_gradient_checkpointing_restores_the_previous_state():
    model = tiny_lm()
    with disable_gradient_checkpointing(model):
        assert not model.is_activation_checkpointing
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    with pytest.raises(RuntimeError, match="boom"), disable_gradient_checkpointing(model):
        assert not model.is_activation_checkpointing
        raise RuntimeError("boom")
    assert model.is_activation_checkpointing


def test_unwrap_model_for_generation_pauses_checkpointing_and_overrides_generation_config():
    from accelerate import Accelerator

    model = tiny_lm()
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=False)
    model.activation_checkpointing_enable()
    with unwrap_model_for_generation(model, Accelerator(cpu=True), generation_kwargs={"max_new_tokens": 2}) as m:
        assert m is model and not m.is_activation_checkpointing
        assert m.generation_config.max_new_tokens == 2
        out = m.generate(INPUTS[:1], attention_mask=torch.ones_like(INPUTS[:1]))
    assert out.shape[1] - INPUTS.shape[1] <= 2
    assert model.is_activation_checkpointing and model.generation_config.max_new_tokens == 7


def test_prepare_deepspeed_without_deepspeed_names_the_install():
    pytest.importorskip("torch")  # deepspeed itself is absent in this environment
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("deepspeed is installed")
    with pytest.raises(ImportError, match="pip install deepspeed"):
        prepare_deepspeed(nn.Linear(2, 2), accelerator=None)


def test_prepare_fsdp_rejects_unknown_versions():
    plugin = types.SimpleNamespace(fsdp_version=3)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match="FSDP version 3 is not supported"):
        prepare_fsdp(nn.Linear(2, 2), accelerator)


def test_zero3_hook_helpers_detach_and_reattach():
    module = nn.Linear(2, 2)
    module.ds_external_parameters = lambda: []
    for p in module.parameters():
        p.ds_active_sub_modules = {1, 2}
    removed = []
    hook = types.SimpleNamespace(remove=lambda: removed.append(True))
    registered = []
    offload = types.SimpleNamespace(
        module=module,
        forward_hooks=[hook],
        backward_hooks=[hook],
        _register_deepspeed_module=registered.append,
    )
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(parameter_offload=offload))
    remove_hooks(engine)
    assert removed == [True, True] and offload.forward_hooks == [] and offload.backward_hooks == []
    assert all(p.ds_active_sub_modules == set() for p in module.parameters())
    add_hooks(engine)
    assert registered == [module]
    remove_hooks(types.SimpleNamespace())  # before the optimizer exists: nothing to do
    with pytest.raises(RuntimeError, match="optimizer is None"):
        remove_hooks(types.SimpleNamespace(optimizer=None))

"""TRL's memory options wired into the trainers: activation offloading (`activation_offloading=True`, through
`llm_trainer.models.get_act_offloading_ctx_manager`) and SFT's selective activation checkpointing
(`gradient_checkpointing_kwargs={"selective": True}`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llm_trainer import SFTConfig, SFTTrainer
from llm_trainer.models.activation_offloading import OffloadActivations
from llm_trainer.testing import zen_dataset


def _config(tmp_path, **kwargs) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    return SFTConfig(**{**defaults, **kwargs})


def _train_losses(trainer: SFTTrainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _assert_same_losses(actual: list[float], expected: list[float]) -> None:
    # Same ops in the same order on the same data: the losses (of order 5) agree to float32 rounding.
    assert len(actual) == len(expected) == 2
    assert actual == pytest.approx(expected, rel=1e-5)


def _checkpoint_kwargs(model: torch.nn.Module) -> list[dict]:
    """The keyword arguments each checkpointed layer passes to `torch.utils.checkpoint.checkpoint`."""
    return [
        module._gradient_checkpointing_func.keywords
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func")
    ]


# ------------------------------------------------------------------------------------------ activation offloading
def test_activation_offloading_trains_to_the_same_losses(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_language_modeling")
    plain = SFTTrainer(model=tiny_model_path, args=_config(tmp_path / "plain"), train_dataset=dataset)
    assert isinstance(plain.maybe_activation_offload_context, contextlib.nullcontext)
    expected = _train_losses(plain)

    args = _config(tmp_path / "offloaded", activation_offloading=True)
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset)
    manager = trainer.maybe_activation_offload_context
    assert isinstance(manager, OffloadActivations)  # one manager, built once and entered at every step
    # On a CPU-only machine activations already live in CPU memory; treat CPU as the device so every saved tensor
    # really is copied out and back.
    manager.accelerator_type, manager.min_tensor_size_bytes = "cpu", 0
    copied = []
    pack = manager.pack_hook
    manager.pack_hook = lambda tensor: (copied.append(tensor.shape), pack(tensor))[1]
    actual = _train_losses(trainer)

    assert copied, "training_step did not run under the offloading manager"
    assert trainer.maybe_activation_offload_context is manager
    _assert_same_losses(actual, expected)


# ------------------------------------------------------------------------------ selective activation checkpointing
def test_selective_checkpointing_needs_gradient_checkpointing(tiny_model_path, tmp_path):
    args = _config(tmp_path, gradient_checkpointing=False, gradient_checkpointing_kwargs={"selective": True})
    with pytest.raises(ValueError, match="requires `gradient_checkpointing=True`"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))


def test_selective_checkpointing_needs_non_reentrant_checkpointing(tiny_model_path, tmp_path):
    kwargs = {"selective": True, "use_reentrant": True}
    args = _config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    with pytest.raises(ValueError, match="requires non-reentrant gradient checkpointing"):
        SFTTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_language_modeling"))


def test_selective_checkpointing_saves_attention_and_trains_like_full_checkpointing(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_language_modeling")
    full = SFTTrainer(
        model=tiny_model_path,
        args=_config(
            tmp_path / "full", gradient_checkpointing=True, gradient_checkpointing_kwargs={"selective": False}
        ),
        train_dataset=dataset,
    )
    assert full.args.gradient_checkpointing_kwargs == {}  # the TRL-only key never reaches torch
    expected = _train_losses(full)  # `Trainer.train` turns checkpointing on
    assert all("context_fn" not in kwargs for kwargs in _checkpoint_kwargs(full.model))

    args = _config(tmp_path / "sac", gradient_checkpointing=True, gradient_checkpointing_kwargs={"selective": True})
    trainer = SFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset)
    actual = _train_losses(trainer)
    layers = _checkpoint_kwargs(trainer.model)
    assert layers, "gradient checkpointing is not on"
    for kwargs in layers:
        assert "selective" not in kwargs and kwargs["use_reentrant"] is False and "context_fn" in kwargs
    _assert_same_losses(actual, expected)


def test_selective_checkpointing_reaches_the_model_under_peft(tiny_model_path, tmp_path):
    peft = pytest.importorskip("peft")
    args = _config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"selective": True})
    trainer = SFTTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_language_modeling"),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    # What `Trainer.train` does: a PEFT wrapper forwards the call to the model it wraps.
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    layers = _checkpoint_kwargs(trainer.model)
    assert layers and all("context_fn" in kwargs for kwargs in layers)

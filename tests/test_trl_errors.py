"""The same bad input raises the same exception type here as in TRL 1.16, and our (reworded) message keeps the phrase
of TRL's that a user may match on. Each case runs on both libraries; skipped when TRL is not installed."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest

pytest.importorskip("trl")

COMMON = dict(output_dir="unused", report_to="none", use_cpu=True)


@dataclass
class Case:
    id: str
    trigger: Callable[[ModuleType], object]
    """Called with the library (`trl` or `llm_trainer`); must raise."""
    error: type[Exception]
    phrase: str
    """Part of TRL's message that ours keeps."""


def _lm(lib):
    from llm_trainer.testing import make_tiny_model

    return make_tiny_model()


def _reward_with_two_labels(lib):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from llm_trainer.testing import make_tiny_model, zen_dataset

    path = make_tiny_model(task="sequence-classification")
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=2))
    return lib.RewardTrainer(
        model=model, args=lib.RewardConfig(**COMMON), train_dataset=zen_dataset("standard_preference")
    )


def _no_train_dataset(trainer: str, config: str, **kwargs):
    def trigger(lib):
        return getattr(lib, trainer)(_lm(lib), args=getattr(lib, config)(**COMMON), train_dataset=None, **kwargs)

    return trigger


CASES = [
    Case(
        "grpo_one_generation",
        lambda lib: lib.GRPOConfig(**COMMON, num_generations=1, per_device_train_batch_size=2),
        ValueError,
        "at least 2 generations per prompt",
    ),
    Case(
        "rloo_one_generation",
        lambda lib: lib.RLOOConfig(**COMMON, num_generations=1, per_device_train_batch_size=2),
        ValueError,
        "at least 2 generations per prompt",
    ),
    Case(
        "grpo_generation_batch_not_divisible",
        lambda lib: lib.GRPOConfig(
            **COMMON, num_generations=4, per_device_train_batch_size=3, generation_batch_size=6
        ),
        ValueError,
        "must be divisible by num_generations",
    ),
    Case(
        "grpo_generation_batch_not_divisible_by_global_batch",
        lambda lib: lib.GRPOConfig(
            **COMMON, num_generations=2, per_device_train_batch_size=4, generation_batch_size=6
        ),
        ValueError,
        "must be divisible by the global batch size",
    ),
    Case(
        "grpo_generation_batch_and_steps",
        lambda lib: lib.GRPOConfig(
            **COMMON, num_generations=2, per_device_train_batch_size=2, generation_batch_size=4, steps_per_generation=2
        ),
        ValueError,
        "can not be both configured at the same time",
    ),
    Case(
        "grpo_auto_find_batch_size",
        lambda lib: lib.GRPOConfig(
            **COMMON, num_generations=2, per_device_train_batch_size=2, auto_find_batch_size=True
        ),
        ValueError,
        "auto_find_batch_size is not supported",
    ),
    Case(
        "grpo_clip_min_above_max",
        lambda lib: lib.GRPOConfig(
            **COMMON,
            num_generations=2,
            per_device_train_batch_size=2,
            vllm_importance_sampling_clip_min=3.0,
            vllm_importance_sampling_clip_max=2.0,
        ),
        ValueError,
        "must be less than",
    ),
    Case(
        "grpo_hub_repo_without_logging",
        lambda lib: lib.GRPOConfig(
            **COMMON, num_generations=2, per_device_train_batch_size=2, log_completions_hub_repo="me/completions"
        ),
        ValueError,
        "log_completions is False",
    ),
    Case("distillation_beta_out_of_range", lambda lib: lib.DistillationConfig(**COMMON, beta=1.5), ValueError, "beta"),
    Case(
        "dpo_loss_weights_length",
        lambda lib: lib.DPOConfig(**COMMON, loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
        ValueError,
        "must have the same length as `loss_type`",
    ),
    Case(
        "model_config_8_and_4_bit",
        lambda lib: lib.ModelConfig(load_in_8bit=True, load_in_4bit=True),
        ValueError,
        "8 bit and 4 bit",
    ),
    Case("reward_two_labels", _reward_with_two_labels, ValueError, "reward models require `num_labels=1`"),
    Case(
        "sft_no_train_dataset", _no_train_dataset("SFTTrainer", "SFTConfig"), ValueError, "`train_dataset` is required"
    ),
    Case(
        "dpo_no_train_dataset", _no_train_dataset("DPOTrainer", "DPOConfig"), ValueError, "`train_dataset` is required"
    ),
]


@pytest.mark.parametrize("library", ["trl", "llm_trainer"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_error_as_trl(case: Case, library: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    lib = importlib.import_module(library)
    with pytest.raises(Exception) as info:
        case.trigger(lib)
    assert type(info.value) is case.error or isinstance(info.value, case.error), (
        f"{library} raised {type(info.value).__name__}: {info.value}"
    )
    assert case.phrase in str(info.value), f"{library}'s message lacks {case.phrase!r}: {info.value}"

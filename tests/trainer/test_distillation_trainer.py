"""DistillationTrainer on tiny offline models: the student learns and the teacher stays frozen, TRL's metric names,
conversational prompts and evaluation, a teacher loaded by name, completion logging, and bad input."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset
from llm_trainer.trainer.distillation_config import DistillationConfig
from llm_trainer.trainer.distillation_trainer import DistillationTrainer

METRICS = {
    "num_tokens",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "entropy",
    "step_time",
}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> str:
    """A wider tiny Qwen2 sharing the student's tokenizer and vocabulary."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), seed=1, hidden_size=48)


def _config(tmp_path, **kwargs) -> DistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=3,
    )
    return DistillationConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trains_the_student_and_freezes_the_teacher(tiny_model_path, teacher_path, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
    trainer = DistillationTrainer(
        model=tiny_model_path,
        teacher_model=teacher,
        args=_config(tmp_path, beta=0.5, gradient_accumulation_steps=2),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    student_before, teacher_before = _params(trainer.model), _params(trainer.teacher_model)
    trainer.train()

    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, student_before[n])]
    assert len(changed) == len(student_before)  # every student weight, the LM head included, is updated
    assert all(torch.equal(p, teacher_before[n]) for n, p in trainer.teacher_model.named_parameters())
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert METRICS <= set(entry)
        assert not {key for key in entry if key.startswith(("reward", "clip_ratio", "kl"))}
        assert entry["loss"] > 0 and 0 < entry["entropy"] <= torch.log(torch.tensor(668.0)).item() + 1e-4
        assert entry["completions/max_length"] <= 8


def test_distilling_a_model_into_itself_gives_zero_loss(tiny_model_path, tmp_path):
    """Teacher == student weights: every divergence is 0, so the student receives no gradient."""
    trainer = DistillationTrainer(
        model=tiny_model_path,
        teacher_model=tiny_model_path,  # loaded by name: a separate, identical copy
        args=_config(tmp_path, max_steps=1, beta=0.0),
        train_dataset=zen_dataset("standard_prompt_only"),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert abs(logs[0]["loss"]) < 1e-6 and logs[0]["grad_norm"] < 1e-5


def test_conversational_prompts_evaluation_and_completion_logs(tiny_model_path, teacher_path, tmp_path):
    trainer = DistillationTrainer(
        model=tiny_model_path,
        args=_config(
            tmp_path,
            teacher_model_name_or_path=teacher_path,
            teacher_model_init_kwargs={"dtype": "float32"},
            max_steps=1,
            per_device_eval_batch_size=2,
            log_completions=True,
            num_completions_to_print=1,
        ),
        train_dataset=zen_dataset("conversational_prompt_only"),
        eval_dataset=zen_dataset("conversational_prompt_only", "test"),
    )
    trainer.train()
    assert len(trainer._logs["completion"]) == 2
    assert list((tmp_path / "completions").glob("completions_*.parquet"))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_entropy", "eval_completions/mean_length"} <= set(metrics)
    assert metrics["eval_loss"] > 0


def test_peft_student_trains_only_the_adapter(tiny_model_path, teacher_path, tmp_path):
    peft = pytest.importorskip("peft")
    trainer = DistillationTrainer(
        model=tiny_model_path,
        teacher_model=teacher_path,
        args=_config(tmp_path, max_steps=1),
        train_dataset=zen_dataset("standard_prompt_only"),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = _params(trainer.model)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    with pytest.raises(ValueError, match="plain `nn.Linear` LM head"):
        DistillationTrainer(
            model=tiny_model_path,
            teacher_model=teacher_path,
            args=_config(tmp_path),
            train_dataset=zen_dataset("standard_prompt_only"),
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        )


def test_config_defaults_match_trl():
    trl = pytest.importorskip("trl")
    ours, theirs = DistillationConfig("out", bf16=False), trl.DistillationConfig("out", bf16=False)
    for name in (
        "learning_rate",
        "beta",
        "temperature",
        "max_completion_length",
        "top_p",
        "top_k",
        "min_p",
        "remove_unused_columns",
        "shuffle_dataset",
        "pad_to_multiple_of",
        "use_vllm",
        "vllm_mode",
        "logging_steps",
        "gradient_checkpointing",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert {f for f in vars(theirs) if not f.startswith("_")} <= {f for f in vars(ours) if not f.startswith("_")}


@pytest.mark.parametrize(("beta", "temperature"), [(-0.1, 1.0), (1.5, 1.0), (0.5, 0.0)])
def test_config_rejects_bad_values(beta, temperature):
    with pytest.raises(ValueError, match="beta must be in|temperature must be positive"):
        DistillationConfig("out", beta=beta, temperature=temperature)


def _trainer(tmp_path, model, teacher, dataset=None, **kwargs):
    return DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=_config(tmp_path),
        train_dataset=dataset if dataset is not None else zen_dataset("standard_prompt_only"),
        **kwargs,
    )


def test_bad_input_raises(tiny_model_path, teacher_path, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(tmp_path, tiny_model_path, None)
    other_vocab = make_tiny_model(tmp_path / "other-vocab", vocab_size=700)
    with pytest.raises(ValueError, match="vocab_size is 668 but the teacher's is 700"):
        _trainer(tmp_path, tiny_model_path, other_vocab)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="is the student itself"):
        _trainer(tmp_path, student, student, processing_class=get_tokenizer())
    with pytest.raises(ValueError, match="no 'prompt' column"):
        _trainer(tmp_path, tiny_model_path, teacher_path, Dataset.from_dict({"text": ["a", "b"]}))
    with pytest.raises(ValueError, match="already instantiated"):
        DistillationTrainer(
            model=tiny_model_path,
            teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path),
            args=_config(tmp_path, teacher_model_init_kwargs={"dtype": "float32"}),
            train_dataset=zen_dataset("standard_prompt_only"),
        )


def test_unsupported_features_raise(tiny_model_path, teacher_path, tmp_path):
    def tool(x: int) -> int:
        """Identity.

        Args:
            x: a number.
        """
        return x

    with pytest.raises(NotImplementedError, match="tool calling"):
        _trainer(tmp_path, tiny_model_path, teacher_path, tools=[tool])
    with pytest.raises(NotImplementedError, match="vision-language"):
        _trainer(tmp_path, tiny_model_path, teacher_path, Dataset.from_dict({"prompt": ["a"], "image": [None]}))
    with pytest.raises(NotImplementedError, match="log_unique_prompts"):
        DistillationTrainer(
            model=tiny_model_path,
            teacher_model=teacher_path,
            args=_config(tmp_path, log_unique_prompts=True),
            train_dataset=zen_dataset("standard_prompt_only"),
        )

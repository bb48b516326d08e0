"""GKDTrainer on tiny offline models: the student learns and the teacher stays frozen on each data source (dataset,
on-policy, seq_kd), the loss equals a plain full-logits generalized JSD, evaluation, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from llm_trainer import GKDConfig, GKDTrainer
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset

FLOAT32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> str:
    """A wider tiny Qwen2 sharing the student's tokenizer and vocabulary."""
    return make_tiny_model(tmp_path_factory.mktemp("gkd-teacher"), seed=1, hidden_size=48)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return zen_dataset("conversational_language_modeling")


def _config(tmp_path, **kwargs) -> GKDConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    return GKDConfig(**{**defaults, **kwargs})


def _trainer(student, teacher, dataset, tmp_path, **kwargs) -> GKDTrainer:
    return GKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, **kwargs), train_dataset=dataset)


def _count_generate(monkeypatch, model) -> list[int]:
    calls = []
    generate = model.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


@pytest.mark.parametrize(
    "options, source",
    [({"lmbda": 0.0}, "dataset"), ({"lmbda": 1.0}, "student"), ({"lmbda": 0.0, "seq_kd": True}, "teacher")],
    ids=["off-policy", "on-policy", "seq-kd"],
)
def test_trains_from_each_source(options, source, tiny_model_path, teacher_path, dataset, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_path, teacher_path, dataset, tmp_path, **options)
    student_calls = _count_generate(monkeypatch, trainer.model)
    teacher_calls = _count_generate(monkeypatch, trainer.teacher_model)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    teacher_before = {name: p.detach().clone() for name, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    assert len(student_calls) == (2 if source == "student" else 0)
    assert len(teacher_calls) == (2 if source == "teacher" else 0)
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed, "no student parameter changed"
    assert all(torch.equal(p, teacher_before[name]) for name, p in trainer.teacher_model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and entry["loss"] >= 0 for entry in logs)
    assert set(logs[0]) == {"loss", "grad_norm", "learning_rate", "epoch", "step"}  # TRL GKD's names


def test_sampled_completions_replace_the_dataset_ones(tiny_model_path, teacher_path, dataset, tmp_path):
    trainer = _trainer(tiny_model_path, teacher_path, dataset, tmp_path, lmbda=1.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    sampled = trainer.sample_completions(trainer.model, batch)
    width = batch["prompts"].shape[1]
    assert torch.equal(sampled["input_ids"][:, :width], batch["prompts"])
    assert sampled["input_ids"].shape[1] <= width + 6
    assert (sampled["labels"][:, :width] == -100).all()
    completion_labels = sampled["labels"][:, width:]
    completion_mask = sampled["attention_mask"][:, width:]
    assert torch.equal(completion_labels != -100, completion_mask.bool())
    eos = trainer.generation_config.eos_token_id
    eos = torch.tensor(eos).reshape(-1)
    for row, mask in zip(sampled["input_ids"][:, width:], completion_mask):  # trained up to the first stop token
        kept = row[mask.bool()]
        assert not torch.isin(kept[:-1], eos).any()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_matches_full_logits_reference(beta, tiny_model_path, teacher_path, dataset, tmp_path):
    trainer = _trainer(tiny_model_path, teacher_path, dataset, tmp_path, beta=beta)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)

    def logits(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()

    with torch.no_grad():
        log_s = logits(trainer.model).log_softmax(-1)
        log_t = logits(trainer.teacher_model).log_softmax(-1)
    if beta == 0.0:
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif beta == 1.0:
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.log((1 - beta) * log_s.exp() + beta * log_t.exp())
        per_token = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(
            -1
        )
    mask = batch["labels"][:, 1:] != -100
    reference = per_token[mask].sum() / mask.sum()
    # the divergence compares log-probabilities of size ~log(vocab): float32 rounds it to a few eps of that size
    tolerance = 32 * FLOAT32_EPS * math.log(log_s.shape[-1])
    assert reference.item() > 100 * tolerance  # the comparison is not vacuous
    assert loss.item() == pytest.approx(reference.item(), abs=tolerance)
    static = GKDTrainer.generalized_jsd_loss(
        logits(trainer.model).detach(), logits(trainer.teacher_model), batch["labels"][:, 1:], beta=beta
    )
    assert static.item() == pytest.approx(reference.item(), abs=tolerance)
    loss.backward()
    assert trainer.model.get_output_embeddings().weight.grad is not None


def test_evaluates(tiny_model_path, teacher_path, dataset, tmp_path):
    trainer = GKDTrainer(
        model=tiny_model_path,
        teacher_model=teacher_path,
        args=_config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=dataset,
        eval_dataset=zen_dataset("conversational_language_modeling", "test"),
    )
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0


def test_teacher_by_name_in_config(tiny_model_path, teacher_path, dataset, tmp_path):
    trainer = GKDTrainer(
        model=tiny_model_path,
        args=_config(tmp_path, teacher_model_name_or_path=teacher_path),
        train_dataset=dataset,
        processing_class=get_tokenizer(),
    )
    assert trainer.teacher_model.config.hidden_size == 48


@pytest.mark.parametrize(
    "options, message",
    [({"lmbda": 1.5}, "lmbda must be in"), ({"beta": -0.1}, "beta must be in"), ({"temperature": 0.0}, "temperature")],
)
def test_bad_config(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **options)


def test_bad_input(tiny_model_path, teacher_path, dataset, tmp_path):
    with pytest.raises(ValueError, match="'messages' column"):
        _trainer(tiny_model_path, teacher_path, zen_dataset("conversational_prompt_only"), tmp_path)
    no_answer = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    with pytest.raises(ValueError, match="end with an 'assistant' turn"):
        _trainer(tiny_model_path, teacher_path, no_answer, tmp_path)
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(tiny_model_path, None, dataset, tmp_path)
    other_vocab = make_tiny_model(tmp_path / "other-vocab", vocab_size=1100)
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(tiny_model_path, other_vocab, dataset, tmp_path)
    with pytest.raises(ValueError, match="packing=True"):
        _trainer(tiny_model_path, teacher_path, dataset, tmp_path, packing=True)
    with pytest.raises(ValueError, match="formatting_func"):
        GKDTrainer(
            tiny_model_path, teacher_path, _config(tmp_path), train_dataset=dataset, formatting_func=lambda row: ""
        )
    with pytest.raises(ValueError, match="no prompt tokens left"):
        _trainer(tiny_model_path, teacher_path, dataset, tmp_path, max_length=4)


@pytest.mark.parametrize("beta, softcap", [(0.0, None), (0.5, 30.0), (1.0, None)])
def test_fused_divergence_matches_chunked(beta, softcap):
    """The gradient-in-forward loss equals `chunked_distillation_loss`, value and gradients, chunk size aside."""
    from llm_trainer.losses.distillation import chunked_distillation_loss, fused_distillation_loss

    torch.manual_seed(0)
    hidden, teacher_hidden = torch.randn(3, 7, 16), torch.randn(3, 7, 24)
    weight, teacher_weight = torch.randn(50, 16) * 0.3, torch.randn(50, 24) * 0.3
    bias = torch.randn(50) * 0.1
    mask = torch.rand(3, 7) > 0.3
    results = []
    for function, chunk_size in ((chunked_distillation_loss, None), (fused_distillation_loss, 4)):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss, entropy, count = function(
            h,
            w,
            teacher_hidden,
            teacher_weight,
            mask,
            beta,
            0.8,
            9,
            student_bias=b,
            student_softcap=softcap,
            chunk_size=chunk_size,
        )
        loss.backward()
        results.append((loss, entropy, count, h.grad, w.grad, b.grad))
    for ours, reference in zip(results[1], results[0]):
        # sums of ~mask.sum() terms of size ~log(50) (values) or ~1 (gradients): a few float32 eps of that size
        assert torch.allclose(ours, reference, rtol=1e-5, atol=32 * FLOAT32_EPS * math.log(50))


def test_cli_trains_with_a_teacher_from_the_flags(tiny_model_path, teacher_path, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from llm_trainer.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset("conversational_language_modeling"):
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="teacher_model_name_or_path"):
        main(["gkd", "--model_name_or_path", tiny_model_path, "--dataset_name", str(folder), "--output_dir", str(out)])
    main(
        ["gkd", "--model_name_or_path", tiny_model_path, "--teacher_model_name_or_path", teacher_path]
        + ["--dataset_name", str(folder), "--output_dir", str(out), "--max_steps", "1", "--report_to", "none"]
        + ["--per_device_train_batch_size", "2", "--max_new_tokens", "4", "--bf16", "false", "--lmbda", "1.0"]
        + ["--save_strategy", "no", "--learning_rate", "0.1", "--beta", "0.5", "--dataloader_pin_memory", "false"]
    )
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)

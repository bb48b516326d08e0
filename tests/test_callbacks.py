"""TRL's callbacks at `llm_trainer.trainer.callbacks`: BEMA, completion logging (wandb / Comet / Weave), TR-DPO sync."""

import importlib.machinery
import sys
import types
from unittest.mock import call, patch

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, GenerationConfig, Trainer, TrainerState, TrainingArguments

import llm_trainer
from llm_trainer import callbacks as simple_callbacks
from llm_trainer.testing import get_tokenizer, tiny_model_config, zen_dataset
from llm_trainer.trainer.callbacks import (
    BEMACallback,
    LogCompletionsCallback,
    RichProgressCallback,
    SyncRefModelCallback,
    WeaveCallback,
)


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config())


def lm_dataset(tokenizer, rows: int = 17) -> Dataset:
    texts = [r["text"] for r in zen_dataset("standard_language_modeling")][:rows]
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    return Dataset.from_dict({**encoded, "labels": encoded["input_ids"]})


def make_trainer(tmp_path, callbacks=(), eval_dataset=None, **args):
    tokenizer = get_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no", **args)
    return Trainer(
        model=tiny_lm(),
        args=args,
        train_dataset=lm_dataset(tokenizer),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def test_exported_at_trl_paths():
    import llm_trainer.trainer as trainer_pkg

    for name in ("BEMACallback", "LogCompletionsCallback", "RichProgressCallback", "SyncRefModelCallback"):
        assert getattr(llm_trainer, name) is getattr(trainer_pkg, name) is getattr(simple_callbacks, name)
    assert llm_trainer.WeaveCallback is WeaveCallback


# ------------------------------------------------------------------------------------------------------------ BEMA
def test_bema_matches_a_hand_computed_update():
    model = tiny_lm()
    args = TrainingArguments(output_dir="unused", report_to="none")
    bema = BEMACallback(update_freq=2, ema_power=0.5, bias_power=0.2, lag=10, multiplier=1.0)
    bema.on_train_begin(args, TrainerState(), None, model=model)
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = {n: t.clone() for n, t in theta0.items()}
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        bema.on_step_end(args, TrainerState(global_step=step), None, model=model)
        if step % 2 == 0:  # steps 2 and 4
            beta = (10 + step) ** -0.5
            for n, p in model.named_parameters():
                ema[n] = (1 - beta) * ema[n] + beta * p.detach().double()
    running = dict(bema.running_model.named_parameters())
    for n, p in model.named_parameters():
        expected = ema[n] + 14**-0.2 * (p.detach().double() - theta0[n])  # α at the last update, step 4
        scale = expected.abs().max().item()
        torch.testing.assert_close(running[n].double(), expected, rtol=0, atol=1e-6 * scale, msg=n)
        assert not torch.equal(running[n].double(), p.detach().double())  # an average, not the weights


def test_bema_burn_in_restarts_from_the_weights_at_update_after():
    model = tiny_lm()
    args = TrainingArguments(output_dir="unused", report_to="none")
    bema = BEMACallback(update_freq=1, update_after=2, ema_power=0.0)  # β = 1: EMA = θₜ
    bema.on_train_begin(args, TrainerState(), None, model=model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    bema.on_step_end(args, TrainerState(global_step=2), None, model=model)  # θ₀ := current weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    bema.on_step_end(args, TrainerState(global_step=3), None, model=model)
    alpha = (10 + 3) ** -0.2
    for (n, p), run in zip(model.named_parameters(), bema.running_model.parameters(), strict=True):
        expected = p.detach() + alpha * 0.5  # EMA = θ₃, θ₃ − θ₀ = 0.5
        torch.testing.assert_close(run, expected, rtol=0, atol=1e-5 * expected.abs().max().item(), msg=n)


def test_bema_averages_only_trainable_parameters():
    model = tiny_lm()
    model.model.embed_tokens.weight.requires_grad_(False)
    args = TrainingArguments(output_dir="unused", report_to="none")
    bema = BEMACallback(update_freq=1)
    bema.on_train_begin(args, TrainerState(), None, model=model)
    assert "model.embed_tokens.weight" not in bema.param_names
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    bema.on_step_end(args, TrainerState(global_step=1), None, model=model)
    frozen = bema.running_model.model.embed_tokens.weight
    torch.testing.assert_close(frozen, model.model.embed_tokens.weight - 1.0)  # the copy taken at train begin


def test_bema_update_schedule_and_saving_in_a_training_run(tmp_path):
    bema = BEMACallback(update_freq=2)
    trainer = make_trainer(tmp_path, [bema], per_device_train_batch_size=8, num_train_epochs=3)
    with patch.object(bema, "_update_bema_weights", wraps=bema._update_bema_weights) as update:
        trainer.train()  # 17 rows, batches of 8: 3 steps per epoch, 9 in all
    assert update.call_args_list == [call(2), call(4), call(6), call(8)]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bema")
    for a, b in zip(saved.parameters(), bema.running_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bema_rejects_a_non_positive_update_freq():
    with pytest.raises(ValueError, match="update_freq"):
        BEMACallback(update_freq=0)


# --------------------------------------------------------------------------------------------- completion logging
def prompt_dataset():
    return zen_dataset("standard_prompt_only", "test")


def tokenized_prompt_dataset():
    """Prompts plus the tokenized columns the Trainer's evaluation loss needs (as in TRL's own test)."""
    tokenizer = get_tokenizer()
    encoded = tokenizer(list(prompt_dataset()["prompt"]), padding="max_length", max_length=12, truncation=True)
    return (
        prompt_dataset()
        .add_column("input_ids", encoded["input_ids"])
        .add_column("attention_mask", encoded["attention_mask"])
        .add_column("labels", encoded["input_ids"])
    )


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_log_completions_needs_an_eval_dataset_with_prompts(tmp_path):
    with pytest.raises(ValueError, match="must have an evaluation dataset"):
        LogCompletionsCallback(make_trainer(tmp_path))
    with pytest.raises(ValueError, match="'prompt' column"):
        LogCompletionsCallback(make_trainer(tmp_path, eval_dataset=Dataset.from_dict({"text": ["a"]})))


def test_log_completions_logs_a_table_to_wandb_and_comet(tmp_path, monkeypatch):
    class Table:
        def __init__(self, dataframe):
            self.dataframe = dataframe.copy()

    wandb_log = _Recorder()
    fake_module(monkeypatch, "wandb", log=wandb_log, Table=Table)
    experiment = types.SimpleNamespace(log_table=_Recorder())
    fake_module(monkeypatch, "comet_ml", get_running_experiment=lambda: experiment)
    monkeypatch.setattr(transformers, "is_comet_available", lambda: True)  # read when the table is logged

    trainer = make_trainer(
        tmp_path,
        eval_dataset=tokenized_prompt_dataset(),
        per_device_train_batch_size=8,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer.args.report_to = ["wandb", "comet_ml"]  # after init: transformers' own reporters stay off
    callback = LogCompletionsCallback(trainer, GenerationConfig(max_new_tokens=3, do_sample=False), num_prompts=2)
    trainer.add_callback(callback)
    tokenizer = trainer.processing_class
    tokenizer.padding_side = "right"
    trainer.train()

    assert [row[0] for row in callback.table] == ["2", "2", "4", "4"]  # default freq: every eval_steps
    assert [row[1] for row in callback.table[:2]] == list(prompt_dataset()["prompt"])[:2]
    assert all(isinstance(row[2], str) for row in callback.table)
    assert len(wandb_log.calls) == 2
    logged = wandb_log.calls[-1][0][0]["completions"].dataframe
    assert list(logged.columns) == ["step", "prompt", "completion"] and len(logged) == 4
    comet_calls = experiment.log_table.calls
    assert len(comet_calls) == 2 and all(kw["filename"] == "completions.csv" for _, kw in comet_calls)
    assert tokenizer.padding_side == "right"  # generation padded left, then restored


def test_log_completions_freq_and_no_reporter(tmp_path):
    trainer = make_trainer(tmp_path, eval_dataset=prompt_dataset(), per_device_train_batch_size=8, max_steps=3)
    callback = LogCompletionsCallback(trainer, GenerationConfig(max_new_tokens=2, do_sample=False), freq=3)
    trainer.add_callback(callback)
    trainer.train()
    assert [row[0] for row in callback.table] == ["3", "3"]  # both test prompts, at step 3 only
    assert trainer.model.training  # generated (at the last step) in eval mode, then training mode restored


# ---------------------------------------------------------------------------------------------------------- weave
def test_weave_callback_without_weave_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "weave", None)  # import of weave fails, as when it is not installed
    with pytest.raises(ImportError, match="pip install weave"):
        WeaveCallback(make_trainer(tmp_path, eval_dataset=prompt_dataset()))


def install_fake_weave(monkeypatch, client=None):
    events = []

    class Prediction:
        def __init__(self, inputs, output):
            events.append(("prediction", inputs["prompt"], output))

        def log_score(self, scorer, score):
            events.append(("score", scorer, score))

        def finish(self):
            events.append(("finish_prediction",))

    class EvaluationLogger:
        def __init__(self, model, dataset, eval_attributes):
            events.append(("logger", model, dataset, eval_attributes["training_step"]))

        def log_prediction(self, inputs, output):
            return Prediction(inputs, output)

        def log_summary(self, summary):
            events.append(("summary", summary))

        def finish(self):
            events.append(("finish",))

    inits = []
    weave = fake_module(monkeypatch, "weave", EvaluationLogger=EvaluationLogger, init=lambda p: inits.append(p) or p)
    context = types.SimpleNamespace(get_weave_client=lambda: client)
    fake_module(monkeypatch, "weave.trace")
    fake_module(monkeypatch, "weave.trace.context", weave_client_context=context)
    return weave, events, inits


def test_weave_callback_logs_scored_predictions(tmp_path, monkeypatch):
    _, events, inits = install_fake_weave(monkeypatch)
    trainer = make_trainer(
        tmp_path, eval_dataset=tokenized_prompt_dataset(), per_device_train_batch_size=8, max_steps=1
    )

    def failing(prompt, completion):
        raise RuntimeError("scorer bug")

    callback = WeaveCallback(
        trainer,
        project_name="team/project",
        scorers={"length": lambda p, c: float(len(p)), "broken": failing},
        generation_config=GenerationConfig(max_new_tokens=2, do_sample=False),
        model_name="tiny",
    )
    trainer.add_callback(callback)
    trainer.train()
    assert inits == ["team/project"]
    trainer.evaluate()
    prompts = list(prompt_dataset()["prompt"])
    assert events[0] == ("logger", "tiny", "eval_dataset", 1)
    assert [e[1] for e in events if e[0] == "prediction"] == prompts
    assert [e[2] for e in events if e[0] == "score"] == [float(len(p)) for p in prompts]
    summary = events[-1][1]
    assert events[-1][0] == "summary" and summary["avg_length"] == sum(len(p) for p in prompts) / len(prompts)
    assert summary["successful_predictions"] == 2 and "avg_broken" not in summary


def test_weave_callback_needs_a_project_without_a_client(tmp_path, monkeypatch):
    install_fake_weave(monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)
    callback = WeaveCallback(make_trainer(tmp_path, eval_dataset=prompt_dataset()))
    with pytest.raises(ValueError, match="No existing Weave client found and no project_name provided"):
        callback._initialize_weave()


def test_weave_callback_traces_without_scorers_into_a_running_client(tmp_path, monkeypatch):
    _, events, inits = install_fake_weave(monkeypatch, client=object())
    trainer = make_trainer(tmp_path, eval_dataset=prompt_dataset())
    callback = WeaveCallback(trainer, generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))
    assert not callback.is_evaluation_mode
    callback.on_evaluate(trainer.args, TrainerState(global_step=5), None, processing_class=trainer.processing_class)
    assert inits == [] and events[-1] == ("finish",)
    assert not any(e[0] == "score" for e in events)


# ----------------------------------------------------------------------------------------------- sync / progress
def test_sync_ref_model_mixes_the_policy_in_every_sync_steps():
    policy, ref = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = [p.detach().clone() for p in ref.parameters()]
    callback = SyncRefModelCallback(ref_model=ref)
    args = types.SimpleNamespace(ref_model_sync_steps=2, ref_model_mixup_alpha=0.25)
    callback.on_step_end(args, TrainerState(global_step=1), None, model=policy)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), before, strict=True))
    callback.on_step_end(args, TrainerState(global_step=2), None, model=policy)
    for r, b, p in zip(ref.parameters(), before, policy.parameters(), strict=True):
        torch.testing.assert_close(r, 0.75 * b + 0.25 * p.detach())


def test_rich_progress_callback_runs_a_training(tmp_path):
    trainer = make_trainer(
        tmp_path,
        [RichProgressCallback()],
        eval_dataset=lm_dataset(get_tokenizer(), rows=4),
        per_device_train_batch_size=8,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer.train()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RichProgressCallback))
    assert callback._live is None and callback._eval_task is None  # stopped and cleaned up

"""ORPOTrainer / CPOTrainer behaviour on the tiny offline model: training changes the weights, metrics are named as
in TRL (with the eval prefix), the config mirrors TRL's, bad input fails with a message naming the fix."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from llm_trainer import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer
from llm_trainer.testing import zen_dataset
from llm_trainer.trainer import reference_free_trainer

SHARED_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "nll_loss",
}
TRAINERS = {"orpo": (ORPOTrainer, ORPOConfig), "cpo": (CPOTrainer, CPOConfig)}


def _config(config_cls, tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=False,
        save_strategy="no",
    )
    return config_cls(**{**defaults, **kwargs})


def _trainer(name, model, tmp_path, dataset="standard_preference", **kwargs):
    trainer_cls, config_cls = TRAINERS[name]
    return trainer_cls(model=model, args=_config(config_cls, tmp_path, **kwargs), train_dataset=zen_dataset(dataset))


@pytest.mark.parametrize(
    ("name", "dataset", "extra_metrics"),
    [
        ("orpo", "standard_preference", {"log_odds_ratio", "log_odds_chosen"}),
        ("orpo", "conversational_implicit_prompt_preference", {"log_odds_ratio", "log_odds_chosen"}),
        ("cpo", "conversational_preference", set()),
    ],
)
def test_training_updates_every_parameter(name, dataset, extra_metrics, tiny_model_path, tmp_path):
    trainer = _trainer(name, tiny_model_path, tmp_path, dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for param_name, param in trainer.model.named_parameters():
        assert not torch.equal(before[param_name], param), f"{param_name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert set(logs[0]) - {"loss", "grad_norm", "learning_rate", "epoch", "step"} == SHARED_METRICS | extra_metrics
    assert all(torch.isfinite(torch.tensor(value)) for value in logs[0].values())


@pytest.mark.parametrize("name", ["orpo", "cpo"])
def test_eval_metrics_are_prefixed(name, tiny_model_path, tmp_path):
    trainer_cls, config_cls = TRAINERS[name]
    args = _config(config_cls, tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = trainer_cls(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_preference"),
        eval_dataset={"zen": zen_dataset("standard_preference", "test")},
    )
    trainer.train()
    eval_logs = [log for log in trainer.state.log_history if "eval_zen_loss" in log]
    # TRL prefixes the metrics with "eval_" whatever the eval set's name (only the Trainer's own keys get it)
    assert eval_logs and {f"eval_{key}" for key in SHARED_METRICS} <= set(eval_logs[0])
    # a raw dataset passed to `evaluate` is prepared like the constructor's; predictions are TRL's logits pair
    metrics = trainer.evaluate(zen_dataset("conversational_preference", "test"))
    assert {f"eval_{key}" for key in SHARED_METRICS} <= set(metrics) and "rewards/chosen" not in metrics
    prediction = trainer.predict(trainer.eval_dataset["zen"])
    assert prediction.predictions.shape == (2,)  # one eval batch: [logits/chosen, logits/rejected]


def test_orpo_nll_covers_the_prompt_and_cpo_nll_the_completion(tiny_model_path, tmp_path):
    """ORPO's `nll_loss` averages over every real token of the chosen sequence, CPO's over its completion only."""
    orpo = _trainer("orpo", tiny_model_path, tmp_path / "orpo")
    cpo = _trainer("cpo", tiny_model_path, tmp_path / "cpo")
    rows = [orpo.train_dataset[i] for i in range(3)]
    batch = orpo.data_collator(rows)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model_path)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:3, :-1]
        nll = -logits.log_softmax(-1).gather(-1, batch["input_ids"][:3, 1:, None])[..., 0]
        orpo_nll = orpo.concatenated_forward(orpo.model, batch).nll_loss
        cpo_nll = cpo.concatenated_forward(cpo.model, batch).nll_loss
    torch.testing.assert_close(orpo_nll, nll[batch["attention_mask"][:3, 1:].bool()].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpo_nll, nll[batch["completion_mask"][:3, 1:].bool()].mean(), rtol=1e-5, atol=1e-5)


def test_cpo_reduces_logps_by_loss_type(tiny_model_path, tmp_path):
    rows = None
    logps = {}
    for loss_type in ("sigmoid", "simpo"):
        trainer = _trainer("cpo", tiny_model_path, tmp_path / loss_type, loss_type=loss_type)
        rows = rows or [trainer.train_dataset[i] for i in range(2)]
        with torch.no_grad():
            logps[loss_type] = trainer.concatenated_forward(trainer.model, trainer.data_collator(rows)).chosen_logps
    lengths = torch.tensor([len(row["chosen_ids"]) for row in rows], dtype=torch.float)
    torch.testing.assert_close(logps["simpo"], logps["sigmoid"] / lengths)  # average for ipo/simpo, sum otherwise


def test_alphapo_is_simpo_without_nll(tiny_model_path, tmp_path):
    args = _config(CPOConfig, tmp_path, loss_type="alphapo", alpha=0.1)
    assert (args.loss_type, args.cpo_alpha, args.alpha) == ("simpo", 0.0, 0.1)
    trainer = CPOTrainer(model=tiny_model_path, args=args, train_dataset=zen_dataset("standard_preference"))
    trainer.train()
    assert all(log["nll_loss"] == 0.0 for log in trainer.state.log_history if "loss" in log)


def test_configs_match_trl_defaults(tmp_path):
    orpo, cpo = ORPOConfig(str(tmp_path)), CPOConfig(str(tmp_path))
    for args in (orpo, cpo):
        assert (args.learning_rate, args.beta, args.max_length, args.disable_dropout) == (1e-6, 0.1, 1024, True)
        assert args.max_completion_length is None and not args.generate_during_eval
        assert args.gradient_checkpointing and args.logging_steps == 10
    assert orpo.padding_value is None
    assert (cpo.loss_type, cpo.cpo_alpha, cpo.simpo_gamma, cpo.alpha, cpo.label_smoothing) == (
        "sigmoid",
        1.0,
        0.5,
        0.0,
        0.0,
    )


def test_model_loads_in_the_checkpoint_dtype_like_trl(tiny_model_path, tmp_path):
    path = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).save_pretrained(path)
    from llm_trainer.testing import get_tokenizer

    get_tokenizer().save_pretrained(path)
    assert _trainer("orpo", str(path), tmp_path).model.dtype == torch.bfloat16
    trainer = _trainer("cpo", str(path), tmp_path, model_init_kwargs={"dtype": "float32"})
    assert trainer.model.dtype == torch.float32


def test_model_init_and_default_max_length(tiny_model_path, tmp_path, caplog):
    args = _config(ORPOConfig, tmp_path, max_length=None)
    trainer = ORPOTrainer(
        args=args,
        train_dataset=zen_dataset("standard_preference"),
        model_init=lambda: AutoModelForCausalLM.from_pretrained(tiny_model_path),
    )
    assert trainer.max_length == 512 and "using 512" in caplog.text


def test_cpo_mirrors_the_pad_token_onto_the_model(tiny_model_path, tmp_path):
    from llm_trainer.testing import get_tokenizer

    tokenizer = get_tokenizer()
    tokenizer.pad_token = None
    trainer = CPOTrainer(
        model=tiny_model_path,
        args=_config(CPOConfig, tmp_path),
        train_dataset=zen_dataset("standard_preference"),
        processing_class=tokenizer,
    )
    assert trainer.padding_value == tokenizer.eos_token_id == trainer.model.config.pad_token_id
    assert trainer.model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_generations_are_logged_during_eval(tiny_model_path, tmp_path, monkeypatch):
    tables = []
    monkeypatch.setattr(reference_free_trainer, "_loggers_for_generations", lambda report_to: [tables.append])
    args = _config(ORPOConfig, tmp_path, generate_during_eval=True, per_device_eval_batch_size=2, max_length=24)
    trainer = ORPOTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=zen_dataset("standard_preference"),
        eval_dataset=zen_dataset("standard_preference", "test"),
    )
    trainer.evaluate()
    assert len(tables) == 1 and len(tables[0]) == 2
    prompts = {prompt for prompt, _ in tables[0]}
    assert prompts == set(zen_dataset("standard_preference", "test")["prompt"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "dpo"}, "Unknown `loss_type` 'dpo'; choose one of sigmoid, hinge, ipo, simpo, alphapo"),
        ({"loss_type": "kto_pair"}, "use `KTOTrainer`"),
        ({"loss_type": "ipo", "beta": 0.0}, "divides by `beta`; set `beta` > 0"),
        ({"label_smoothing": 0.7}, r"`label_smoothing` must be in \[0, 0.5\]"),
        ({"beta": -1.0}, "`beta` must be >= 0"),
        ({"max_length": 0}, "`max_length` must be a positive number of tokens"),
    ],
)
def test_bad_cpo_config_names_the_fix(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        CPOConfig(str(tmp_path), **kwargs)


@pytest.mark.parametrize("name", ["orpo", "cpo"])
def test_dataset_without_preference_columns_is_rejected(name, tiny_model_path, tmp_path):
    trainer_cls, config_cls = TRAINERS[name]
    dataset = Dataset.from_dict({"prompt": ["The sky is"], "completion": [" blue."]})
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected'.*missing: \['chosen', 'rejected'\]"):
        trainer_cls(model=tiny_model_path, args=_config(config_cls, tmp_path), train_dataset=dataset)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        trainer_cls(model=tiny_model_path, args=_config(config_cls, tmp_path))


def test_bad_model_arguments_name_the_fix(tiny_model_path, tmp_path):
    dataset = zen_dataset("standard_preference")
    with pytest.raises(ValueError, match="pass `model` .* or `model_init`"):
        ORPOTrainer(args=_config(ORPOConfig, tmp_path), train_dataset=dataset)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    args = _config(ORPOConfig, tmp_path, model_init_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="model is already instantiated; pass the model's name or path"):
        ORPOTrainer(model=model, args=args, train_dataset=dataset)
    args = _config(CPOConfig, tmp_path, generate_during_eval=True)
    with pytest.raises(ValueError, match="install `wandb` or `comet-ml` and include it in `report_to`"):
        CPOTrainer(model=model, args=args, train_dataset=dataset)


def test_encoder_decoder_models_are_rejected(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from llm_trainer.testing import get_tokenizer

    config = T5Config(vocab_size=len(get_tokenizer()), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    with pytest.raises(ValueError, match="trains decoder-only causal LMs.*Use a causal LM"):
        CPOTrainer(
            model=T5ForConditionalGeneration(config),
            args=_config(CPOConfig, tmp_path),
            train_dataset=zen_dataset("standard_preference"),
            processing_class=get_tokenizer(),
        )


def test_generations_go_to_comet_through_the_shared_table_logger(monkeypatch):
    import sys
    import types

    import transformers

    logged = []
    experiment = types.SimpleNamespace(log_table=lambda **kwargs: logged.append(kwargs))
    monkeypatch.setitem(sys.modules, "comet_ml", types.SimpleNamespace(get_running_experiment=lambda: experiment))
    monkeypatch.setattr(transformers, "is_comet_available", lambda: True)
    monkeypatch.setattr(reference_free_trainer, "is_comet_available", lambda: True)
    loggers = reference_free_trainer._loggers_for_generations(["comet_ml"])
    assert len(loggers) == 1
    loggers[0]([["a prompt", "a completion"]])
    assert len(logged) == 1 and logged[0]["filename"] == "game_log.csv"
    table = logged[0]["tabular_data"]
    assert list(table.columns) == ["Prompt", "Policy"] and table.values.tolist() == [["a prompt", "a completion"]]
    monkeypatch.setattr(reference_free_trainer, "is_comet_available", lambda: False)
    assert reference_free_trainer._loggers_for_generations(["comet_ml"]) == []  # not installed or not configured

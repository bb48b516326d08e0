"""The simple API on the tiny offline model: every example of docs/simple_api.md (model and dataset names swapped for
local ones, step counts shrunk), the documented errors, `Callback` hooks and their order, `TrainResult` /
`TrainingResult`, checkpoints, the nested-dict form, and examples/simple_grpo.py."""

from __future__ import annotations

import inspect
import re
import runpy
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from llm_trainer import (
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RLOOTrainer,
    SFTTrainer,
    TrainingResult,
    TrainResult,
    create_trainer,
    get_algorithm,
    list_algorithms,
    register_algorithm,
    train,
)
from llm_trainer.callbacks import Callback
from llm_trainer.testing import get_tokenizer, make_tiny_model, zen_dataset
from llm_trainer.trainer.simple import load_training_dataset, simple_reward_functions, split_options

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "simple_api.md"
MODEL_IDS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B")
DATASETS = {
    "trl-lib/tldr": "standard_prompt_only",
    "trl-lib/Capybara": "conversational_language_modeling",
    "trl-lib/ultrafeedback_binarized": "conversational_implicit_prompt_preference",
}
FAST = {"gradient_checkpointing": False, "disable_tqdm": True}
GRPO_SMALL = {"max_steps": 2, "batch_size": 2, "num_generations_per_prompt": 4, "max_sequence_length": 8, **FAST}

# one marker per example of the doc page (each must match exactly one ```python block)
EXAMPLES = {
    "minimal": 'dataset="trl-lib/tldr", reward_fn=reward_fn)',
    "sft": 'algorithm="sft"',
    "dpo": 'algorithm="dpo"',
    "list": "dataset = [",
    "options": "use_leave_one_out_baseline=True",
    "callbacks": "class PrintReward(Callback)",
    "grpo_shortcuts": "GRPOTrainer.from_pretrained(",
    "sft_dpo_shortcuts": "SFTTrainer.from_pretrained(",
    "full_config": '"policy": {',
    "algorithms": "list_algorithms()",
}


def reward_len(prompt: str, response: str) -> float:
    return float(len(response))


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory) -> dict[str, str]:
    """The doc's Hub datasets as local `save_to_disk` folders of their zen twins."""
    root = tmp_path_factory.mktemp("datasets")
    dirs = {}
    for name, config in DATASETS.items():
        dirs[name] = str(root / config)
        zen_dataset(config).save_to_disk(dirs[name])
    return dirs


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in `tmp_path`, so `./outputs/...` and the doc's relative checkpoint folders land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def run_doc_example(key, model_path, dataset_dirs, small, replacements=None) -> dict:
    """Run the doc example `key` with the model and dataset names made local, `small` (a dict of tiny settings)
    spliced in after the model argument, and `replacements` (each must occur) applied; return its namespace."""
    (code,) = [block for block in _doc_blocks() if EXAMPLES[key] in block]
    for old, new in (replacements or {}).items():
        assert old in code, f"the {key!r} example no longer contains {old!r}"
        code = code.replace(old, new)
    assert any(model_id in code for model_id in MODEL_IDS)
    for model_id in MODEL_IDS:
        code = code.replace(f'"{model_id}",', "TINY_MODEL, **SMALL,").replace(f'"{model_id}"', "TINY_MODEL")
    for name, path in dataset_dirs.items():
        code = code.replace(f'"{name}"', repr(path))
    namespace = {"TINY_MODEL": model_path, "SMALL": small}
    exec(compile(code, f"{DOC.name}[{key}]", "exec"), namespace)
    return namespace


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- the doc page
def test_every_doc_example_has_a_test():
    blocks = _doc_blocks()
    assert len(blocks) == len(EXAMPLES)
    for key, marker in EXAMPLES.items():
        assert sum(marker in block for block in blocks) == 1, key


def test_doc_minimal_grpo(tiny_model_path, dataset_dirs, in_tmp, capsys):
    ns = run_doc_example("minimal", tiny_model_path, dataset_dirs, GRPO_SMALL)
    result = ns["result"]
    assert isinstance(result, TrainResult) and isinstance(result.trainer, GRPOTrainer)
    assert result.total_steps == 2 and result.trainer.state.global_step == 2
    assert set(result.metrics) >= {"reward", "rewards/reward_fn/mean", "train_loss"}
    default_dir = in_tmp / "outputs" / Path(tiny_model_path).name
    assert Path(result.checkpoint_path).resolve() == (default_dir / "checkpoint-2").resolve()
    assert (default_dir / "checkpoint-2" / "model.safetensors").exists()
    args = result.trainer.args  # train's defaults, with batch_size counted in prompts
    assert (args.learning_rate, args.num_generations, args.max_completion_length) == (1e-6, 4, 8)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    assert f"{result.metrics['reward']} {result.checkpoint_path} 2" in capsys.readouterr().out


def test_doc_sft(tiny_model_path, dataset_dirs, in_tmp):
    result = run_doc_example("sft", tiny_model_path, dataset_dirs, {"max_steps": 2, **FAST})["result"]
    trainer = result.trainer
    assert isinstance(trainer, SFTTrainer) and result.total_steps == 2
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size) == (2e-5, 8)
    assert result.metrics["train_loss"] > 0


def test_doc_dpo(tiny_model_path, dataset_dirs, in_tmp):
    small = {"max_steps": 2, "batch_size": 4, **FAST}
    result = run_doc_example("dpo", tiny_model_path, dataset_dirs, small)["result"]
    assert isinstance(result.trainer, DPOTrainer) and result.total_steps == 2
    assert result.trainer.args.beta == 0.1 and result.trainer.args.learning_rate == 1e-6
    assert result.metrics["train_loss"] > 0


def test_doc_list_of_dicts_and_column_parameters_stop_after_one_epoch(tiny_model_path, dataset_dirs, in_tmp):
    small = {"num_generations_per_prompt": 4, "max_sequence_length": 8, "logging_steps": 1, **FAST}
    result = run_doc_example("list", tiny_model_path, dataset_dirs, small)["result"]
    trainer = result.trainer
    assert trainer.args.scale_rewards == "none"  # normalize_rewards=False
    assert trainer.train_dataset.column_names == ["prompt", "answer"]
    assert result.total_steps == 1  # max_steps=1000, max_epochs=1: two prompts, two per step, so one step
    assert result.checkpoint_path.endswith("checkpoint-1")  # saved when the epoch cap stops training
    assert "rewards/correct/mean" in result.metrics


def test_doc_algorithm_options_select_rloo(tiny_model_path, dataset_dirs, in_tmp, capsys):
    result = run_doc_example("options", tiny_model_path, dataset_dirs, GRPO_SMALL)["result"]
    trainer = result.trainer
    assert isinstance(trainer, RLOOTrainer) and result.total_steps == 2
    assert (trainer.args.beta, trainer.args.temperature, trainer.args.num_generations) == (0.05, 0.8, 4)
    assert "RLOOTrainer" in capsys.readouterr().out


def test_doc_callbacks(tiny_model_path, dataset_dirs, in_tmp, capsys):
    run_doc_example("callbacks", tiny_model_path, dataset_dirs, GRPO_SMALL)
    out = capsys.readouterr().out
    assert re.search(r"step 1: reward [0-9.]+\n", out) and re.search(r"step 2: reward [0-9.]+\n", out)
    assert "done after 2 steps; checkpoint: " in out and "checkpoint-2" in out


def test_doc_grpo_shortcuts_and_checkpoint_resume(tiny_model_path, dataset_dirs, in_tmp, capsys):
    replacements = {
        "num_prompts_per_step=32, num_generations_per_prompt=16": "num_prompts_per_step=2, num_generations_per_prompt=4",
        "max_steps=200": "max_steps=1",
        "max_steps=400": "max_steps=2",
    }
    small = {"max_sequence_length": 8, "logging_steps": 1, **FAST}
    ns = run_doc_example("grpo_shortcuts", tiny_model_path, dataset_dirs, small, replacements)
    trainer, result, later = ns["trainer"], ns["result"], ns["later"]
    assert isinstance(result, TrainingResult) and result.total_steps == 1 and 0 < result.total_epochs <= 1
    assert "reward" in result.metrics and result.best_checkpoint_path.endswith("checkpoint-1")
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{")]  # not the logs
    assert lines[0] == "2"  # gradient_accumulation_steps = num_prompts_per_step
    assert lines[2] == "1"  # current_step of the loaded checkpoint, before fit
    saved = in_tmp / "checkpoints" / "grpo-200"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert isinstance(later, GRPOTrainer) and later.current_step == 2
    steps = [entry["step"] for entry in later.state.log_history if "loss" in entry]
    assert steps == [1, 2]  # the resumed run kept the first step's log and trained one more
    assert later.model.config._name_or_path == "checkpoints/grpo-200"
    assert trainer.current_step == 1


def test_doc_sft_then_dpo_shortcuts(tiny_model_path, dataset_dirs, in_tmp):
    ns = run_doc_example("sft_dpo_shortcuts", tiny_model_path, dataset_dirs, FAST, {"beta=0.1)": "beta=0.1, **SMALL)"})
    sft, dpo = ns["sft"], ns["dpo"]
    assert isinstance(sft, SFTTrainer) and sft.current_step == 3  # 17 rows, 8 per step, one epoch
    assert isinstance(dpo, DPOTrainer) and dpo.current_step == 3 and dpo.config.beta == 0.1
    assert dpo.model.config._name_or_path == "checkpoints/sft"
    trained, reference = _params(sft.model), dict(dpo.ref_model.named_parameters())
    assert len(trained.keys() & reference.keys()) == len(trained)  # DPO's reference is the SFT model it starts from
    assert all(torch.equal(trained[name], reference[name]) for name in trained)


def test_doc_full_configuration_form(tiny_model_path, dataset_dirs, in_tmp):
    replacements = {
        '"num_prompts_per_step": 32': '"num_prompts_per_step": 2',
        '"num_generations_per_prompt": 16': '"num_generations_per_prompt": 4',
        '"max_sequence_length": 512': '"max_sequence_length": 8',
        '"max_steps": 500': '"max_steps": 2',
        '"output_dir": "outputs/grpo-tldr",': '"output_dir": "outputs/grpo-tldr", **SMALL,',
    }
    ns = run_doc_example("full_config", tiny_model_path, dataset_dirs, FAST, replacements)
    trainer, result = ns["trainer"], ns["result"]
    assert isinstance(trainer, GRPOTrainer) and result.total_steps == 2
    args = trainer.config
    assert (args.loss_type, args.beta, args.num_generations, args.max_completion_length) == ("dapo", 0.04, 4, 8)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    assert result.best_checkpoint_path == str(Path("outputs/grpo-tldr/checkpoint-2"))
    assert len(trainer.train_dataset) == 17


def test_doc_algorithms(tiny_model_path, dataset_dirs, in_tmp, capsys):
    ns = run_doc_example("algorithms", tiny_model_path, dataset_dirs, FAST, {"max_steps=10": "max_steps=1"})
    assert isinstance(ns["trainer"], DPOTrainer) and ns["trainer"].current_step == 1
    assert capsys.readouterr().out.splitlines()[0] == str(list_algorithms())


def test_five_line_example_script(tiny_model_path, in_tmp, capsys):
    runpy.run_path(str(ROOT / "examples" / "simple_grpo.py"), run_name="__main__")
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"reward after 5 steps: -?[0-9.]+; checkpoint: outputs/tiny-qwen2-\w+/checkpoint-5", last_line)


# ----------------------------------------------------------------------------------------------- errors
def test_documented_errors(tiny_model_path, in_tmp):
    prompts = zen_dataset("standard_prompt_only")
    with pytest.raises(ValueError, match=r"Unknown algorithm 'ppx'; choose one of \['async_grpo', 'bco'"):
        train(tiny_model_path, prompts, reward_len, algorithm="ppx")
    with pytest.raises(ValueError, match="GRPOTrainer needs a dataset"):
        train(tiny_model_path, reward_fn=reward_len)
    with pytest.raises(ValueError, match="GRPOTrainer needs a reward: pass `reward_fn`"):
        train(tiny_model_path, prompts)
    with pytest.raises(ValueError, match="SFTTrainer does not use a reward function"):
        train(tiny_model_path, zen_dataset("standard_language_modeling"), reward_len, algorithm="sft")
    with pytest.raises(TypeError, match=r"reward_fn.*does not fit.*reward_fn\(prompt: str, response: str\)"):
        train(tiny_model_path, prompts, lambda text: 1.0)
    with pytest.raises(TypeError, match=r"\['gold'\] are not dataset columns"):
        train(tiny_model_path, prompts, lambda prompt, response, gold: 1.0)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['bogus'\]"):
        train(tiny_model_path, prompts, reward_len, bogus=1)
    with pytest.raises(TypeError, match="`num_generations_per_prompt` applies to online RL"):
        train(tiny_model_path, prompts, algorithm="sft", num_generations_per_prompt=4)
    with pytest.raises(TypeError, match="`use_leave_one_out_baseline` applies to 'grpo' and 'rloo'"):
        train(tiny_model_path, prompts, algorithm="dpo", use_leave_one_out_baseline=True)
    with pytest.raises(ValueError, match="RLOO always uses the leave-one-out baseline"):
        create_trainer("rloo", tiny_model_path, use_leave_one_out_baseline=False)
    with pytest.raises(ValueError, match="`num_generations_per_prompt` sets `num_generations`, which is also given"):
        GRPOTrainer.from_pretrained(tiny_model_path, num_generations_per_prompt=4, num_generations=4)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['num_prompts_per_step'\]: they are neither"):
        SFTTrainer.from_pretrained(tiny_model_path, num_prompts_per_step=4)
    with pytest.raises(ValueError, match="`max_steps` must be positive"):
        SFTTrainer.from_pretrained(tiny_model_path).fit(prompts, max_steps=0)
    with pytest.raises(TypeError, match=r"`batch_size=2.5` \(float\) is invalid: pass a whole number of examples"):
        SFTTrainer.from_pretrained(tiny_model_path, batch_size=2.5)
    with pytest.raises(TypeError, match=r"`learning_rate='1e-5'` \(str\) is invalid: `learning_rate` takes a number"):
        train(tiny_model_path, prompts, reward_len, learning_rate="1e-5")
    with pytest.raises(ValueError, match=r"PPOTrainer needs a reward: pass `reward_fn`, e\.g\..*\.$"):
        create_trainer("ppo", tiny_model_path).fit(prompts)  # PPO's reward is a model: `reward_fn=<model or path>`
    with pytest.raises(NotImplementedError, match="SFTTrainer does not take an `environment`"):
        SFTTrainer.from_pretrained(tiny_model_path).fit(
            zen_dataset("standard_language_modeling"), environment=object()
        )


def test_full_configuration_errors(tiny_model_path):
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['trainer'\].*expected 'policy', 'grpo'"):
        GRPOTrainer({"policy": {"model_name_or_path": tiny_model_path}, "trainer": {}})
    with pytest.raises(ValueError, match="'policy' must name the model once"):
        GRPOTrainer({"policy": {"model": tiny_model_path, "model_name": tiny_model_path}})
    with pytest.raises(ValueError, match=r"\['learning_rate'\] set both under 'policy' and under 'grpo'"):
        GRPOTrainer({"policy": {"model": tiny_model_path, "learning_rate": 1.0}, "grpo": {"learning_rate": 2.0}})
    with pytest.raises(ValueError, match="'data' must be a dataset"):
        GRPOTrainer({"policy": {"model": tiny_model_path}, "data": {"dataset": [{"prompt": "a"}], "shuffle": True}})
    trainer = SFTTrainer({"policy": {"model_name": tiny_model_path, "tokenizer": get_tokenizer()}, "sft": {}})
    assert isinstance(trainer, SFTTrainer) and trainer.config.learning_rate == 2e-5
    with pytest.raises(RuntimeError, match="call `fit` instead of `train`"):
        trainer.train()
    with pytest.raises(RuntimeError, match="Nothing to save yet"):
        trainer.save_checkpoint("nowhere")
    with pytest.raises(ValueError, match="SFTTrainer needs a dataset"):
        trainer.fit()


# ----------------------------------------------------------------------------------------------- options
def test_from_pretrained_defaults_and_translations(tiny_model_path, monkeypatch):
    grpo = GRPOTrainer.from_pretrained(tiny_model_path)
    args = grpo.config
    assert (args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 16, 32)
    assert (args.learning_rate, args.max_completion_length, args.scale_rewards) == (1e-6, 512, "group")
    assert args.output_dir == str(Path("outputs") / Path(tiny_model_path).name) and grpo.current_step == 0
    assert GRPOTrainer.from_pretrained(tiny_model_path, normalize_rewards=False).config.scale_rewards == "none"
    assert GRPOTrainer.from_pretrained(tiny_model_path, normalize_rewards="batch").config.scale_rewards == "batch"
    assert RLOOTrainer.from_pretrained(tiny_model_path, normalize_rewards=True).config.normalize_advantages is True
    explicit = GRPOTrainer.from_pretrained(tiny_model_path, gradient_accumulation_steps=3, max_completion_length=5)
    assert (explicit.config.gradient_accumulation_steps, explicit.config.max_completion_length) == (3, 5)
    assert DPOTrainer.from_pretrained(tiny_model_path).config.beta == 0.1
    sft = SFTTrainer.from_pretrained(tiny_model_path, max_sequence_length=64, max_epochs=2)
    assert (sft.config.per_device_train_batch_size, sft.config.max_length, sft.config.num_train_epochs) == (8, 64, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # batch sizes count examples over all processes
    config, _ = split_options(SFTTrainer, {"batch_size": 8})
    assert config["per_device_train_batch_size"] == 4
    config, _ = split_options(GRPOTrainer, {"batch_size": 8})
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (16, 4)
    with pytest.raises(
        ValueError, match=r"`batch_size=5` must be a positive multiple of the number of processes \(2\)"
    ):
        split_options(SFTTrainer, {"batch_size": 5})


def test_trainer_signatures_are_the_constructors():
    for trainer_class in (GRPOTrainer, SFTTrainer, DPOTrainer):
        expected = list(inspect.signature(trainer_class.__init__).parameters)[1:]
        assert list(inspect.signature(trainer_class).parameters) == expected
    assert list(inspect.signature(GRPOTrainer).parameters)[:3] == ["model", "reward_funcs", "args"]


def test_algorithm_registry():
    assert list_algorithms() == sorted(
        ["sft", "dpo", "grpo", "rloo", "kto", "orpo", "cpo", "bco", "reward", "prm", "ppo", "teacher_grpo"]
        + ["distillation"]
        + ["gkd", "online_dpo", "xpo", "nash_md", "async_grpo"]
    )
    assert get_algorithm("GRPO") is GRPOTrainer and get_algorithm("sft") is SFTTrainer
    assert get_algorithm("teacher_grpo").__name__ == "TeacherGRPOTrainer"

    class MyTrainer(GRPOTrainer):
        _name = "Mine"

    register_algorithm("mine", MyTrainer)
    try:
        assert get_algorithm("mine") is MyTrainer and "mine" in list_algorithms()
        assert MyTrainer.from_pretrained("m").config.num_generations == 16  # inherits GRPO's simple defaults
    finally:
        from llm_trainer import registry

        registry.ALGORITHMS.pop("mine")
    with pytest.raises(TypeError, match="subclass of llm_trainer's BaseTrainer"):
        register_algorithm("plain", Trainer)


# ----------------------------------------------------------------------------------------------- callbacks
class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append(("train_begin", trainer))

    def on_step_begin(self, trainer, step):
        self.events.append(("step_begin", step))

    def on_step_end(self, trainer, step, metrics):
        self.events.append(("step_end", step, metrics))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch_end", epoch, metrics))

    def on_train_end(self, trainer, result):
        self.events.append(("train_end", result))


class CountingHFCallback(TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_callbacks_get_the_trainer_step_metrics_and_result_in_order(tiny_model_path, tmp_path):
    recorder, counter = Recorder(), CountingHFCallback()
    trainer = GRPOTrainer.from_pretrained(
        tiny_model_path, output_dir=str(tmp_path), **{**GRPO_SMALL, "max_steps": 100}, logging_steps=1
    )
    result = trainer.fit(zen_dataset("standard_prompt_only"), reward_len, max_steps=2, callbacks=[recorder, counter])
    assert [event[:2] for event in recorder.events] == [
        ("train_begin", trainer),
        ("step_begin", 1),
        ("step_end", 1),
        ("step_begin", 2),
        ("step_end", 2),
        ("epoch_end", 1),
        ("train_end", result),
    ]
    assert counter.steps == 2 and recorder.trainer is trainer
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for _, step, metrics in (event for event in recorder.events if event[0] == "step_end"):
        assert metrics["reward"] == logged[step]["reward"]  # this step's own metrics, not the previous step's
    assert recorder.events[5][2]["reward"] == logged[2]["reward"]
    assert result == TrainingResult.from_state(trainer.state, str(tmp_path))
    assert result.metrics["train_loss"] == trainer.state.log_history[-1]["train_loss"]
    assert result.best_checkpoint_path == str(tmp_path / "checkpoint-2") and result.total_epochs == trainer.state.epoch


def test_callback_works_in_a_plain_transformers_trainer(tiny_model_path, tmp_path):
    tokenizer = get_tokenizer()
    ids = tokenizer(["Beautiful is better than ugly."] * 4)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    recorder = Recorder()
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to="none", disable_tqdm=True
    )
    trainer = Trainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args, train_dataset=dataset)
    trainer.add_callback(recorder)
    recorder.trainer = trainer
    trainer.train()
    names = [event[0] for event in recorder.events]
    assert names == ["train_begin", "step_begin", "step_end", "step_begin", "step_end", "epoch_end", "train_end"]
    assert recorder.events[0][1] is trainer and recorder.events[2][1] == 1
    assert recorder.events[4][2]["loss"] == trainer.state.log_history[1]["loss"]
    assert recorder.events[-1][1].total_steps == 2
    recorder.on_step_end(None, 7, {"x": 1.0})  # a plain call reaches the hook as written
    assert recorder.events[-1] == ("step_end", 7, {"x": 1.0})


# ----------------------------------------------------------------------------------------------- checkpoints
def test_fit_on_a_built_trainer_and_checkpoint_round_trip(tiny_model_path, tmp_path):
    config = GRPOConfig(
        str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,
    )

    def lengths(completions, **kwargs):  # TRL's reward-function form, as a trainer built the usual way takes
        return [float(len(completion)) for completion in completions]

    trainer = GRPOTrainer(tiny_model_path, lengths, config, train_dataset=zen_dataset("standard_prompt_only"))
    with pytest.raises(ValueError, match="already has its dataset and rewards"):
        trainer.fit(zen_dataset("standard_prompt_only"))
    before = _params(trainer.model)
    result = trainer.fit()
    assert result.total_steps == 1 and result.best_checkpoint_path is None  # save_strategy="no"
    trained = _params(trainer.model)
    assert any(not torch.equal(before[name], value) for name, value in trained.items())
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(1.0)
    trainer.state.global_step = 0
    trainer.load_checkpoint(path)
    assert trainer.current_step == 1 and trainer.config is trainer.args
    assert all(torch.equal(trained[name], value) for name, value in _params(trainer.model).items())
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        trainer.load_checkpoint(tmp_path)


def test_fit_with_an_environment(tiny_model_path, tmp_path):
    if "environment" not in inspect.signature(GRPOTrainer).parameters:
        pytest.skip("GRPOTrainer takes no `environment` yet")
    from llm_trainer.environments import MathAnswerEnvironment

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus 2?"}], "answer": str(a + 2)} for a in range(4)]
    trainer = GRPOTrainer.from_pretrained(tiny_model_path, output_dir=str(tmp_path), logging_steps=1, **GRPO_SMALL)
    result = trainer.fit(rows, environment=MathAnswerEnvironment)  # no reward_fn: the environment scores
    assert result.total_steps == 2 and "rewards/environment_reward/mean" in result.metrics


def test_ppo_through_the_simple_api(tiny_model_path, tmp_path):
    reward_model = make_tiny_model(tmp_path / "rm", task="sequence-classification", seed=1)
    tokenizer = get_tokenizer()
    prompts = zen_dataset("standard_prompt_only")
    prompts = prompts.map(lambda row: tokenizer(row["prompt"]), remove_columns=prompts.column_names)
    trainer = create_trainer(
        "ppo",
        tiny_model_path,
        batch_size=4,
        total_episodes=8,
        response_length=6,
        output_dir=str(tmp_path / "run"),
        **FAST,
    )
    result = trainer.fit(prompts, reward_fn=reward_model)  # PPO's reward is a model; its tokenizer comes from `model`
    assert result.total_steps == 1 and "objective/scores" in result.metrics
    assert trainer.reward_model.config._name_or_path == reward_model


# ----------------------------------------------------------------------------------------------- data and rewards
def test_simple_reward_functions_adapt_to_the_trainer_contract():
    seen = []

    def judge(prompt, response, answer, *, level=0):
        seen.append((prompt, response, answer, level))
        return answer in response

    rewards = simple_reward_functions(judge, ["prompt", "answer", "level", "other"])
    assert rewards.__name__ == "judge"
    conversational = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "It is 2"}]}]
    out = rewards(
        prompts=[conversational, "plain"],
        completions=[completion, "three"],
        answer=["2", "4"],
        level=[1, 2],
        other=[0, 0],
        trainer_state=None,
    )
    assert out == [1.0, 0.0]
    assert seen == [("Be brief.\n1+1?", "It is 2", "2", 1), ("plain", "three", "4", 2)]

    def with_kwargs(prompt, response, **columns):
        return float(sorted(columns) == ["answer"])

    assert simple_reward_functions(with_kwargs, ["prompt", "answer"])(["p"], ["c"], answer=["a"], log_metric=None) == [
        1.0
    ]
    assert simple_reward_functions(lambda prompt, response: None, [])(["p"], ["c"]) == [None]

    def trl_style(completions, **kwargs):
        return [0.0] * len(completions)

    assert simple_reward_functions([trl_style, "some/reward-model"], []) == [trl_style, "some/reward-model"]
    with pytest.raises(TypeError, match="returned 'yes'; return a float"):
        simple_reward_functions(lambda prompt, response: "yes", [])(["p"], ["c"])
    with pytest.raises(TypeError, match="must be a function"):
        simple_reward_functions(3, [])


def test_load_training_dataset_forms(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert load_training_dataset(rows).to_list() == rows
    dataset = Dataset.from_list(rows)
    assert load_training_dataset(dataset) is dataset
    DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(tmp_path / "dict")
    assert load_training_dataset(str(tmp_path / "dict"), split="test").to_list() == rows[:1]
    dataset.to_json(tmp_path / "rows.jsonl")
    assert load_training_dataset(tmp_path / "rows.jsonl").to_list() == rows
    with pytest.raises(ValueError, match="no 'validation' split"):
        load_training_dataset(DatasetDict({"train": dataset}), split="validation")
    with pytest.raises(ValueError, match="non-empty list of dicts"):
        load_training_dataset(["a", "b"])
    with pytest.raises(TypeError, match="`dataset` must be a dataset name or path"):
        load_training_dataset(42)
    (tmp_path / "rows.xyz").write_text("?")
    with pytest.raises(ValueError, match="Cannot read"):
        load_training_dataset(tmp_path / "rows.xyz")


def test_dataset_paths_that_hold_no_dataset_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("./no_such_folder", "data/train.jsonl", str(tmp_path / "gone.csv")):
        with pytest.raises(FileNotFoundError) as error:
            load_training_dataset(missing)
        assert f"No dataset at {missing!r}: nothing is there" in str(error.value)
        assert "or a Hub dataset id such as 'trl-lib/Capybara'" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"The dataset folder 'empty' holds no data files: put \.json/\.jsonl"):
        load_training_dataset("empty")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError) as error:
        load_training_dataset("broken.jsonl")
    assert "Could not read the dataset at 'broken.jsonl': ArrowInvalid: JSON parse error" in str(error.value)
    assert "JSON Lines files hold one JSON object per line" in str(error.value)


def test_callbacks_that_are_no_callbacks_are_named(tiny_model_path):
    trainer = SFTTrainer.from_pretrained(tiny_model_path)
    with pytest.raises(TypeError, match=r"`callbacks` holds <built-in function print>, which is no callback: pass"):
        trainer.fit(zen_dataset("standard_language_modeling"), callbacks=[print])
    with pytest.raises(
        TypeError, match=r"`callbacks` must be a list of callbacks, got Callback: wrap it in \[\.\.\.\]"
    ):
        trainer.fit(zen_dataset("standard_language_modeling"), callbacks=Callback())


def test_a_second_fit_continues_the_first(tiny_model_path, tmp_path):
    """`fit(max_steps=6)` after `fit(max_steps=3)` takes up the data, optimizer and schedule where the first stopped:
    with a constant learning rate its steps 4-6 are an uninterrupted 6-step run's, and the state counts 6 steps."""
    rows = [{"text": f"line {i}: {' '.join(['word'] * (i % 5 + 1))}"} for i in range(10)]
    options = dict(batch_size=2, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, **FAST)

    def step_losses(trainer) -> dict[int, float]:
        return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    whole = SFTTrainer.from_pretrained(tiny_model_path, output_dir=str(tmp_path / "whole"), **options)
    whole.fit(rows, max_steps=6)
    split = SFTTrainer.from_pretrained(tiny_model_path, output_dir=str(tmp_path / "split"), **options)
    assert split.fit(rows, max_steps=3).total_steps == 3
    result = split.fit(max_steps=6)
    assert result.total_steps == 6 and split.current_step == 6
    assert [e["step"] for e in split.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]  # none replayed
    assert step_losses(split) == step_losses(whole)  # bit for bit: the same computation on the same machine
    assert not [name for name in (tmp_path / "split").iterdir() if name.name.startswith("tmp-")]
    assert split.fit(max_steps=6).total_steps == 6  # a finished run trains nothing more

"""The `llm-trainer` command: a real SFT run from flags and from a YAML config, `env`, and usage errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import llm_trainer
from llm_trainer.cli import env, main
from llm_trainer.registry import ALGORITHMS
from llm_trainer.scripts import _training
from llm_trainer.scripts.utils import DatasetMixtureConfig, get_dataset
from llm_trainer.testing import make_tiny_model, zen_dataset


@pytest.fixture
def dataset_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset("standard_language_modeling"):
            f.write(json.dumps(row) + "\n")
    return str(folder)


def test_sft_from_flags_and_yaml(tiny_model_path, dataset_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_TRAINER_TEST_VAR", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_path}\ndataset_name: {dataset_dir}\nmax_steps: 1\n"
        "report_to: none\nbf16: false\nlearning_rate: 0.5\nenv:\n  LLM_TRAINER_TEST_VAR: set\n"
    )
    out = tmp_path / "out"
    main(["sft", "--config", str(config), "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no"])
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    assert os.environ["LLM_TRAINER_TEST_VAR"] == "set"


def test_env_lists_versions():
    text = env()
    assert "llm_trainer version: " in text and "PyTorch version: " in text and "transformers version: " in text
    assert "TRL version: " in text  # TRL's label, which `trl env` users and its tests look for


def test_vllm_serve_reads_a_config_file_and_flags(tmp_path, monkeypatch):
    from llm_trainer.scripts import vllm_serve

    calls = []
    monkeypatch.setattr(
        vllm_serve, "main", lambda script_args, extra_args=None: calls.append((script_args, extra_args))
    )
    config = tmp_path / "serve.yaml"
    config.write_text("model: some/model\nport: 8123\nbackend: transformers\n")
    main(["vllm-serve", "--config", str(config), "--port", "9000", "--enable-prefix-caching", "true"])
    ((args, extra),) = calls
    assert (args.model, args.port, args.backend, args.enable_prefix_caching) == (
        "some/model",
        9000,
        "transformers",
        True,
    )
    assert extra == []


def test_vllm_serve_usage_errors(tmp_path, capsys):
    from llm_trainer.scripts.vllm_serve import ScriptArguments
    from llm_trainer.scripts.vllm_serve import main as serve_main

    with pytest.raises(SystemExit) as exit_info:
        main(["vllm-serve"])  # no --model
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["vllm-serve", "--model", "m", "--backend", "tensorrt"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    # TRL forwards unknown flags to `vllm serve`; our own server names them instead of ignoring them
    with pytest.raises(SystemExit, match="unrecognized arguments: --swap-space 4"):
        serve_main(ScriptArguments(model="m"), ["--swap-space", "4"])


def test_missing_model_is_a_usage_error(dataset_dir):
    with pytest.raises(SystemExit, match="--model_name_or_path and --dataset_name are required"):
        main(["sft", "--dataset_name", dataset_dir, "--output_dir", "x"])


def test_unknown_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "llm-trainer sft" in capsys.readouterr().out


def test_dpo_from_flags(tiny_model_path, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset("standard_preference"):
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "dpo"
    main(
        [
            "dpo",
            "--model_name_or_path",
            tiny_model_path,
            "--dataset_name",
            str(folder),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--learning_rate",
            "0.1",
            "--report_to",
            "none",
            "--bf16",
            "false",
            "--save_strategy",
            "no",
            "--loss_type",
            "sigmoid",
            "bco_pair",
            "--loss_weights",
            "1.0",
            "0.5",
        ]
    )
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_grpo_with_a_builtin_reward_and_one_from_an_import_path(tiny_model_path, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset("standard_prompt_only"):
            f.write(json.dumps(row) + "\n")
    (tmp_path / "my_rewards.py").write_text(
        "def letters(completions, **kwargs):\n    return [sum(c.isalpha() for c in t) / 8 for t in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(
        ["grpo", "--model_name_or_path", tiny_model_path, "--dataset_name", str(folder), "--output_dir", str(out)]
        + ["--reward_funcs", "think_format_reward", "my_rewards.letters", "--max_steps", "1", "--report_to", "none"]
        + ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4"]
        + ["--bf16", "false", "--save_strategy", "no", "--learning_rate", "0.1"]
    )
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    with pytest.raises(SystemExit, match="Unknown reward function 'nope'"):
        main(
            ["grpo", "--model_name_or_path", tiny_model_path, "--dataset_name", str(folder), "--output_dir", str(out)]
            + ["--reward_funcs", "nope"]
        )


@pytest.mark.parametrize("command", ["sft", "dpo", "kto", "orpo", "cpo", "grpo", "rloo", "reward", "distillation"])
def test_help_lists_the_config_fields(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--learning_rate" in capsys.readouterr().out


def test_distillation_with_a_teacher_from_the_flags(tiny_model_path, tiny_llama_path, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset("standard_prompt_only"):
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    main(
        ["distillation", "--model_name_or_path", tiny_model_path, "--teacher_model_name_or_path", tiny_llama_path]
        + ["--dataset_name", str(folder), "--output_dir", str(out), "--max_steps", "1", "--report_to", "none"]
        + ["--per_device_train_batch_size", "2", "--max_completion_length", "4", "--bf16", "false"]
        + ["--save_strategy", "no", "--learning_rate", "0.1", "--beta", "0.5"]
    )
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


class _Recorder:
    """Stands in for a trainer: records what the CLI built, trains nothing."""

    built: dict = {}

    def __init__(self, **kwargs):
        _Recorder.built = kwargs

    def train(self, resume_from_checkpoint=None):
        pass

    def save_model(self, output_dir):
        pass


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_dataset_name_can_be_a_local_data_file(suffix, tiny_model_path, tmp_path, monkeypatch):
    rows = zen_dataset("standard_language_modeling").to_list()
    path = tmp_path / f"train.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(Dataset.from_list(rows), {"jsonl": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[suffix])(path)
    monkeypatch.setattr(llm_trainer, "SFTTrainer", _Recorder)
    main(["sft", "--model_name_or_path", tiny_model_path, "--dataset_name", str(path), "--output_dir", str(tmp_path)])
    assert _Recorder.built["train_dataset"]["text"] == [row["text"] for row in rows]
    mixture = get_dataset(DatasetMixtureConfig(datasets=[{"path": str(path), "columns": ["text"]}]))
    assert mixture["train"]["text"] == [row["text"] for row in rows]  # a `datasets:` entry may be a file too
    with pytest.raises(SystemExit, match="is a single file, so there is no 'test' split"):
        main(
            ["sft", "--model_name_or_path", tiny_model_path, "--dataset_name", str(path)]
            + ["--eval_strategy", "steps"]
        )


def test_unknown_flag_prints_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--learning_rte", "0.1", "--output_dir", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: llm-trainer sft [--config run.yaml]" in err
    assert "unrecognized arguments: --learning_rte 0.1 (did you mean --learning_rate?)" in err
    assert "Traceback" not in err


def test_config_file_errors_are_usage_errors(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model_name_or_path: [unclosed\nlearning_rate: 1.0e-5\n")
    for config, shown in [
        (str(tmp_path / "missing.yaml"), f"error: --config {tmp_path / 'missing.yaml'}: no such file; pass the path"),
        (str(bad_yaml), f"error: Config file {bad_yaml} is not valid YAML: while parsing a flow sequence"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["sft", "--config", config, "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "usage: llm-trainer sft [--config run.yaml]" in err and shown in err


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (["--max_steps", "-5"], "error: `max_steps=-5` is invalid: it must be >= 1. Use -1 (the default) to train"),
        (["--num_train_epochs", "0"], "error: `num_train_epochs=0.0` is invalid: it must be > 0."),
        (["--per_device_train_batch_size", "0"], "error: `per_device_train_batch_size=0` is invalid: it must be >= 1"),
    ],
)
def test_a_value_a_config_rejects_is_a_usage_error(flags, shown, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert shown in capsys.readouterr().err


def test_dataset_and_reward_function_paths_are_named(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    base = ["--model_name_or_path", tiny_model_path, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"llm-trainer sft: --dataset_name: No dataset at './missing': nothing is"):
        main(["sft", *base, "--dataset_name", "./missing"])
    with pytest.raises(SystemExit, match=r"--dataset_name: No dataset at 'train.jsonl': nothing is there, relative"):
        main(["sft", *base, "--dataset_name", "train.jsonl"])
    with pytest.raises(SystemExit, match=r"--dataset_name: The dataset folder 'empty' holds no data files"):
        main(["sft", *base, "--dataset_name", "empty"])
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "a"}) + "\n")
    (tmp_path / "my_rewards.py").write_text(
        "def letters(completions, **kwargs):\n    return [1.0] * len(completions)\n"
    )
    for path, problem in [
        ("no_such_module.fn", "No module named 'no_such_module'"),
        ("my_rewards.length", "module 'my_rewards' has no attribute 'length'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["grpo", *base, "--dataset_name", "prompts.jsonl", "--reward_funcs", path])
        message = str(exit_info.value.code)
        assert message.startswith(f"Cannot load the reward function '{path}': {problem}. Pass `module.function`")
        assert f"importable from {tmp_path}" in message


@pytest.mark.parametrize("command", _training.TRAINERS)
def test_every_registered_algorithm_is_a_command(command, capsys):
    assert _training.TRAINERS == sorted(name for name, algorithm in ALGORITHMS.items() if algorithm.cli)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--learning_rate" in capsys.readouterr().out


STEPWISE = [{"prompt": "1 + 1 * 2?", "completions": ["1 * 2 = 2.", "1 + 2 = 4."], "labels": [True, False]}] * 4


def _rows_folder(tmp_path, config: str) -> str:
    folder = tmp_path / config
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in STEPWISE if config == "stepwise" else zen_dataset(config):
            f.write(json.dumps(row) + "\n")
    return str(folder)


FAST = ["--max_steps", "1", "--report_to", "none", "--bf16", "false", "--save_strategy", "no"]


@pytest.mark.parametrize(
    ("command", "config", "flags"),
    [
        ("bco", "standard_unpaired_preference", ["--per_device_train_batch_size", "8"]),
        ("prm", "stepwise", ["--per_device_train_batch_size", "2"]),
        ("reward", "standard_preference", ["--per_device_train_batch_size", "2"]),
    ],
)
def test_offline_algorithms_train_from_flags(command, config, flags, tiny_model_path, tmp_path):
    out = tmp_path / "out"
    base = ["--model_name_or_path", tiny_model_path, "--dataset_name", _rows_folder(tmp_path, config)]
    main([command, *base, "--output_dir", str(out), *FAST, *flags])
    assert (out / "model.safetensors").exists() or (out / "adapter_model.safetensors").exists()


def test_ppo_from_flags_tokenizes_the_prompts(tiny_model_path, tmp_path):
    reward_model = make_tiny_model(tmp_path / "rm", task="sequence-classification", seed=1)
    out = tmp_path / "out"
    base = ["--model_name_or_path", tiny_model_path, "--dataset_name", _rows_folder(tmp_path, "standard_prompt_only")]
    flags = ["--reward_model_path", reward_model, "--total_episodes", "8", "--per_device_train_batch_size", "4"]
    main(["ppo", *base, "--output_dir", str(out), *FAST[2:], *flags, "--response_length", "4"])
    assert (out / "model.safetensors").exists()


def test_teacher_grpo_gets_its_student_and_default_reward(tiny_model_path, tiny_llama_path, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_trainer, "TeacherGRPOTrainer", _Recorder)
    base = ["--model_name_or_path", tiny_model_path, "--dataset_name", _rows_folder(tmp_path, "standard_prompt_only")]
    main(["teacher_grpo", *base, "--output_dir", str(tmp_path), "--student_model_name_or_path", tiny_llama_path])
    assert _Recorder.built["student_model"] == tiny_llama_path and _Recorder.built["reward_funcs"] is None
    main(["teacher_grpo", *base, "--output_dir", str(tmp_path), "--reward_funcs", "think_format_reward"])
    assert _Recorder.built["student_model"] is None and len(_Recorder.built["reward_funcs"]) == 1

"""TRL's script modules (`trl.scripts.sft`, `.grpo`, ..., `.env`, `._hf_argparser`) as llm_trainer twins: their
parsers, their `main`, `python -m llm_trainer.run -m trl.scripts.sft`, and the submodules `trl.models` exposes."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import llm_trainer
from llm_trainer.scripts import _training
from llm_trainer.scripts.utils import DatasetMixtureConfig, ScriptArguments, TrlParser
from llm_trainer.testing import zen_dataset
from llm_trainer.trainer.model_config import ModelConfig

SCRIPTS = {
    "sft": "SFTConfig",
    "dpo": "DPOConfig",
    "kto": "KTOConfig",
    "reward": "RewardConfig",
    "grpo": "GRPOConfig",
    "rloo": "RLOOConfig",
    "distillation": "DistillationConfig",
}
FAST = [
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--bf16",
    "false",
    "--learning_rate",
    "0.1",
    "--max_steps",
    "1",
]


def public_names(module) -> set[str]:
    """Functions and classes a module defines itself (not those it imports)."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    }


def write_rows(folder, config: str) -> str:
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset(config):
            f.write(json.dumps(row) + "\n")
    return str(folder)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_each_script_defines_trls_names_and_parses_into_our_configs(name, tmp_path):
    ours = importlib.import_module(f"llm_trainer.scripts.{name}")
    theirs = pytest.importorskip(f"trl.scripts.{name}")
    assert public_names(theirs) <= public_names(ours) | set(ours.__all__)
    assert list(inspect.signature(ours.make_parser).parameters) == ["subparsers", "prog"]
    assert list(inspect.signature(ours.main).parameters)[:4] == [
        "script_args",
        "training_args",
        "model_args",
        "dataset_args",
    ]
    parser = ours.make_parser(prog=f"trl {name}")
    assert isinstance(parser, TrlParser) and parser.prog == f"trl {name}"
    argv = [
        "--model_name_or_path",
        "m",
        "--dataset_name",
        "d",
        "--output_dir",
        str(tmp_path),
        "--learning_rate",
        "3e-5",
    ]
    script, config, model, mixture = parser.parse_args_and_config(argv)
    assert type(config) is getattr(llm_trainer, SCRIPTS[name]) and config.learning_rate == 3e-5
    assert isinstance(script, ScriptArguments) and script.dataset_name == "d"
    assert isinstance(model, ModelConfig) and model.model_name_or_path == "m"
    assert isinstance(mixture, DatasetMixtureConfig) and mixture.datasets == []


def test_online_script_arguments_match_trls_and_take_reward_functions():
    from trl.scripts.grpo import GRPOScriptArguments as Theirs

    from llm_trainer.scripts.grpo import GRPOScriptArguments
    from llm_trainer.scripts.rloo import RLOOScriptArguments

    fields = {f.name: f.default for f in Theirs.__dataclass_fields__.values()}
    for cls in (GRPOScriptArguments, RLOOScriptArguments):
        assert {f.name: f.default for f in cls.__dataclass_fields__.values()} == fields
    script, *_ = _training.make_parser("rloo").parse_args_and_config(
        ["--reward_funcs", "think_format_reward", "pkg.fn", "--output_dir", "x"]
    )
    assert type(script) is RLOOScriptArguments and script.reward_funcs == ["think_format_reward", "pkg.fn"]
    # Only the online scripts take reward options, as in TRL
    with pytest.raises(ValueError, match="reward_funcs"):
        importlib.import_module("llm_trainer.scripts.sft").make_parser().parse_args_and_config(
            ["--reward_funcs", "x", "--output_dir", "x"]
        )


def test_make_parser_adds_a_command_to_subparsers(tmp_path):
    from llm_trainer.scripts import dpo, sft

    cli = TrlParser(prog="trl")
    commands = cli.add_subparsers(dest="command", parser_class=TrlParser)
    assert isinstance(sft.make_parser(commands), TrlParser)
    dpo.make_parser(commands)
    namespace = cli.parse_args(["dpo", "--output_dir", str(tmp_path), "--beta", "0.3"])
    assert namespace.command == "dpo" and namespace.beta == 0.3


def test_main_rejects_bad_input_before_training_with_trls_types(tiny_model_path, tmp_path):
    from llm_trainer.scripts import distillation, grpo, sft

    out = str(tmp_path)
    with pytest.raises(ValueError, match="Either `datasets` or `dataset_name` must be provided"):
        sft.main(ScriptArguments(), llm_trainer.SFTConfig(out), ModelConfig(model_name_or_path=tiny_model_path))
    with pytest.raises(ValueError, match="Could not load reward function 'nope'"):
        grpo.main(
            grpo.GRPOScriptArguments(dataset_name="d", reward_funcs=["nope"]),
            llm_trainer.GRPOConfig(out),
            ModelConfig(model_name_or_path=tiny_model_path),
            DatasetMixtureConfig(),
        )
    with pytest.raises(ImportError, match="Cannot load the reward function 'no_such_module.fn'"):
        grpo.main(
            grpo.GRPOScriptArguments(dataset_name="d", reward_funcs=["no_such_module.fn"]),
            llm_trainer.GRPOConfig(out),
            ModelConfig(model_name_or_path=tiny_model_path),
            DatasetMixtureConfig(),
        )
    with pytest.raises(ValueError, match="A teacher model is required for distillation training"):
        distillation.main(
            ScriptArguments(dataset_name="d"),
            llm_trainer.DistillationConfig(out),
            ModelConfig(model_name_or_path=tiny_model_path),
            DatasetMixtureConfig(),
        )


def test_sft_main_trains_and_saves(tiny_model_path, tmp_path, capsys):
    from llm_trainer.scripts import sft

    data = write_rows(tmp_path / "lm", "standard_language_modeling")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", str(out), *FAST]
    sft.main(*sft.make_parser().parse_args_and_config(argv))
    assert "Training completed." in capsys.readouterr().out
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_grpo_main_trains_with_a_builtin_and_an_imported_reward(tiny_model_path, tmp_path, monkeypatch):
    from llm_trainer.scripts import grpo

    data = write_rows(tmp_path / "prompts", "standard_prompt_only")
    (tmp_path / "my_script_rewards.py").write_text(
        "def letters(completions, **kwargs):\n    return [sum(c.isalpha() for c in t) / 8 for t in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the working directory on sys.path
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", str(out), *FAST]
    argv += ["--reward_funcs", "think_format_reward", "my_script_rewards.letters", "--num_generations", "4"]
    argv += ["--per_device_train_batch_size", "4", "--max_completion_length", "4"]
    script, config, model, mixture = grpo.make_parser().parse_args_and_config(argv)
    grpo.main(script, config, model, mixture)
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_trl_sft_module_runs_through_llm_trainer_run(tiny_model_path, tmp_path):
    data = write_rows(tmp_path / "lm", "standard_language_modeling")
    # Unknown keys of a --config YAML are ignored, as TRL's script `__main__` does (they belong to the launcher)
    (tmp_path / "run.yaml").write_text("max_steps: 1\nnum_processes: 1\n")
    argv = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", "out", *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "llm_trainer.run", "-m", "trl.scripts.sft", "--config", "run.yaml", *argv]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training completed." in result.stdout
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert type(args) is llm_trainer.SFTConfig and args.max_steps == 1


def test_hf_argparser_twin_accepts_none_for_optional_fields():
    from dataclasses import dataclass, field

    import trl.scripts._hf_argparser as theirs

    from llm_trainer.scripts import _hf_argparser as ours

    names = ["DataClass", "DataClassType", "HfArg", "HfArgumentParser", "make_choice_type_function", "string_to_bool"]
    assert all(hasattr(theirs, name) for name in names) and sorted(ours.__all__) == names

    @dataclass
    class Args:
        max_length: int | None = 8
        report_to: str | None = "all"
        flag: bool = ours.HfArg(default=False, help="a flag")
        names: list[str] = field(default_factory=list)

    parser = ours.HfArgumentParser(Args)
    (args,) = parser.parse_args_into_dataclasses(["--max_length", "None", "--report_to", "none", "--flag", "yes"])
    assert args == Args(max_length=None, report_to="none", flag=True)
    (args,) = parser.parse_args_into_dataclasses(["--max_length", "16", "--names", "a", "b"])
    assert args.max_length == 16 and args.names == ["a", "b"]
    assert ours.string_to_bool("t") is True and ours.make_choice_type_function([1, "x"])("1") == 1
    assert issubclass(TrlParser, ours.HfArgumentParser)


def test_print_env_reports_versions(capsys):
    from llm_trainer.scripts.env import print_env

    print_env()
    out = capsys.readouterr().out
    assert "Copy-paste the following information when reporting an issue" in out
    assert "- TRL version: " in out and "- PyTorch version: " in out


def test_models_exposes_its_submodules_like_trl():
    import trl.models

    import llm_trainer.models

    assert set(llm_trainer.models.__all__) == set(trl.models.__all__)
    for name in ("activation_offloading", "selective_activation_checkpointing", "utils"):
        module = getattr(llm_trainer.models, name)
        assert module.__name__ == f"llm_trainer.models.{name}" and name in dir(llm_trainer.models)
    with pytest.raises(AttributeError):
        llm_trainer.models.not_a_module  # noqa: B018


def test_vllm_serve_build_command_round_trips_through_its_parser():
    from llm_trainer.scripts.vllm_serve import ScriptArguments as ServeArguments
    from llm_trainer.scripts.vllm_serve import build_command, make_parser

    wanted = ServeArguments(model="m", port=8001, backend="transformers", enable_prefix_caching=False, dtype="float32")
    command = build_command(wanted, ["--extra", "1"])
    assert command[:3] == [sys.executable, "-m", "llm_trainer.scripts.vllm_serve"]
    assert command[-2:] == ["--extra", "1"] and "--host" not in command  # defaults are left out
    (parsed,) = make_parser().parse_args_and_config(command[3:-2])
    assert parsed == wanted

"""Script utilities against TRL 1.16's own (`ModelConfig`, `ScriptArguments`, dataset mixtures, `TrlParser`, the PEFT
and quantization helpers), and TRL's example scripts run with only their imports switched to llm_trainer."""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from typing import Literal, get_type_hints

import pytest
import torch
import trl
from transformers import AutoModelForCausalLM
from trl.scripts.utils import DatasetConfig as TrlDatasetConfig
from trl.trainer.utils import get_peft_config as trl_get_peft_config
from trl.trainer.utils import get_quantization_config as trl_get_quantization_config

import llm_trainer
from llm_trainer import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_kbit_device_map,
    get_peft_config,
    get_quantization_config,
    init_zero_verbose,
)
from llm_trainer.cli import main as cli_main
from llm_trainer.scripts.utils import DatasetConfig
from llm_trainer.testing import zen_dataset

TRL_SCRIPTS = os.path.join(os.path.dirname(trl.__file__), "scripts")


def field_spec(cls) -> list[tuple]:
    """(name, type, default, choices) of every field, in order."""
    hints = get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        hint = re.sub(r"[\w.]+\.DatasetConfig", "DatasetConfig", str(hints[f.name]))  # either library's class
        spec.append((f.name, hint, default, f.metadata.get("choices") and list(f.metadata["choices"])))
    return spec


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (ModelConfig, trl.ModelConfig),
        (ScriptArguments, trl.ScriptArguments),
        (DatasetMixtureConfig, trl.DatasetMixtureConfig),
        (DatasetConfig, TrlDatasetConfig),
    ],
)
def test_fields_types_and_defaults_match_trl(ours, theirs):
    assert field_spec(ours) == field_spec(theirs)


def test_top_level_names_cover_trls_script_api():
    names = ["ModelConfig", "ScriptArguments", "DatasetMixtureConfig", "TrlParser", "get_dataset", "init_zero_verbose"]
    names += ["get_peft_config", "get_quantization_config", "get_kbit_device_map", "RichProgressCallback"]
    names += ["create_reference_model"]
    for name in names:
        assert name in llm_trainer.__all__ and callable(getattr(llm_trainer, name))
    from llm_trainer.trainer import ModelConfig as from_trainer
    from llm_trainer.trainer.utils import get_peft_config as from_utils

    assert from_trainer is ModelConfig and from_utils is get_peft_config


def test_model_config_post_init():
    assert ModelConfig(lora_target_modules=["all-linear"]).lora_target_modules == "all-linear"
    assert trl.ModelConfig(lora_target_modules=["all-linear"]).lora_target_modules == "all-linear"
    assert ModelConfig(lora_target_modules=["q_proj", "v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="choose one quantization"):
        ModelConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="Invalid `dtype` 'fp32'"):
        ModelConfig(dtype="fp32")


@dataclasses.dataclass
class Knobs:
    """Every kind of field the parser handles differently."""

    count: int = 1
    limit: int | None = 8
    rate: float | None = None
    name: str | None = "a"
    report_to: str = "all"
    mode: Literal["x", "y"] = "x"
    enabled: bool = True
    maybe: bool | None = None
    tags: list[str] | None = None


ARGV_CASES = {
    "flags": [
        "--count",
        "3",
        "--limit",
        "none",
        "--rate",
        "Null",
        "--name",
        "none",
        "--no_enabled",
        "--tags",
        "a",
        "b",
    ],
    "yaml": ["--config", "{config}"],
    "yaml then flags": ["--config", "{config}", "--limit", "5", "--enabled", "true", "--mode", "y", "--tags", "z"],
    "flags around yaml": ["--report_to", "none", "--config", "{config}", "--maybe", "false"],
}


@pytest.mark.parametrize("case", list(ARGV_CASES))
def test_parser_parses_argv_and_yaml_like_trl(case, tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(
        "count: 7\nlimit: null\nrate: 1e-3\nmode: y\nenabled: false\ntags: [q_proj]\nmodel_name_or_path: m\n"
        "lora_target_modules: [all-linear]\nlora_r: 4\ndataset_name: d\nenv:\n  LLM_TRAINER_TEST_ENV: 3\n"
        "datasets:\n  - path: json\n    data_files: a.jsonl\n    fraction: 0.5\n  - path: b\n"
    )
    argv = [arg.format(config=config) for arg in ARGV_CASES[case]]
    monkeypatch.delenv("LLM_TRAINER_TEST_ENV", raising=False)
    ours = TrlParser((Knobs, ScriptArguments, ModelConfig, DatasetMixtureConfig)).parse_args_and_config(argv)
    ours_env = os.environ.pop("LLM_TRAINER_TEST_ENV", None)
    theirs = trl.TrlParser((Knobs, trl.ScriptArguments, trl.ModelConfig, trl.DatasetMixtureConfig))
    theirs = theirs.parse_args_and_config(argv)
    assert [dataclasses.asdict(x) for x in ours] == [dataclasses.asdict(x) for x in theirs]
    assert ours_env == os.environ.get("LLM_TRAINER_TEST_ENV") == ("3" if "yaml" in case else None)
    if case == "yaml then flags":  # the YAML sets defaults, flags win
        knobs, _, model_args, mixture = ours
        assert (knobs.count, knobs.limit, knobs.enabled, knobs.mode, knobs.tags) == (7, 5, True, "y", ["z"])
        assert model_args.lora_target_modules == "all-linear" and model_args.lora_r == 4
        assert mixture.datasets[0] == DatasetConfig(path="json", data_files="a.jsonl", fraction=0.5)


def test_parser_parses_a_trainer_config_like_trl(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("learning_rate: 1e-5\nmax_length: 64\nbf16: false\nreport_to: none\n")
    argv = ["--config", str(config), "--output_dir", str(tmp_path), "--max_length", "none", "--shuffle_dataset"]
    ours = TrlParser((llm_trainer.SFTConfig,)).parse_args_and_config(argv)[0]
    theirs = trl.TrlParser((trl.SFTConfig,)).parse_args_and_config(argv)[0]
    for name in ("learning_rate", "max_length", "shuffle_dataset", "bf16", "report_to", "output_dir"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert (ours.learning_rate, ours.max_length, ours.shuffle_dataset) == (1e-5, None, True)


def test_unknown_arguments_like_trl(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("count: 2\nmystery: 5\n")
    argv = ["--config", str(config), "--stray", "x"]
    for parser in (TrlParser(Knobs), trl.TrlParser(Knobs)):
        with pytest.raises(ValueError, match=r"\['--mystery', '5'\]"):
            parser.parse_args_and_config(argv[:2])
        assert parser.parse_args_and_config(argv[:2], fail_with_unknown_args=False)[0].count == 2
    for kwargs in ({}, {"separate_remaining_strings": True}):
        ours = TrlParser(Knobs).parse_args_and_config(argv, return_remaining_strings=True, **kwargs)
        theirs = trl.TrlParser(Knobs).parse_args_and_config(argv, return_remaining_strings=True, **kwargs)
        assert ours == theirs
    assert ours[1:] == (["--mystery", "5"], ["--stray", "x"])


def test_parser_errors(tmp_path):
    @dataclasses.dataclass
    class HasConfig:
        config: str = "x"

    with pytest.raises(ValueError, match="reserves for the YAML config"):
        TrlParser(HasConfig)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must contain a YAML mapping"):
        TrlParser(Knobs).parse_args_and_config(["--config", str(not_a_mapping)])
    bad_env = tmp_path / "env.yaml"
    bad_env.write_text("env: [A]\n")
    with pytest.raises(ValueError, match="`env` in .* must be a mapping"):
        TrlParser(Knobs).parse_args_and_config(["--config", str(bad_env)])
    with pytest.raises(ValueError, match="`--config` needs a value"):
        TrlParser(Knobs).parse_args_and_config(["--config"])
    config = tmp_path / "ok.yaml"
    config.write_text("count: 4\n")
    assert TrlParser(Knobs).parse_args_and_config([f"--config={config}"])[0].count == 4


def test_peft_config_matches_trl(monkeypatch):
    assert get_peft_config(ModelConfig()) is None
    for kwargs in (
        {"use_peft": True},
        {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "k"]},
        {"use_peft": True, "lora_task_type": "SEQ_CLS", "lora_modules_to_save": ["score"], "use_rslora": True},
        {"use_peft": True, "use_dora": True, "lora_target_parameters": ["mlp.experts.down_proj"]},
    ):
        ours, theirs = get_peft_config(ModelConfig(**kwargs)), trl_get_peft_config(trl.ModelConfig(**kwargs))
        assert type(ours) is type(theirs) and ours.to_dict() == theirs.to_dict()
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=re.escape('pip install "llm-trainer[peft]"')):
        get_peft_config(ModelConfig(use_peft=True))


def test_quantization_config_matches_trl(monkeypatch):
    assert get_quantization_config(ModelConfig()) is None
    for kwargs in (
        {"load_in_8bit": True},
        {"load_in_4bit": True},
        {"load_in_4bit": True, "dtype": "bfloat16", "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True},
    ):
        ours = get_quantization_config(ModelConfig(**kwargs))
        theirs = trl_get_quantization_config(trl.ModelConfig(**kwargs))
        assert ours.to_dict() == theirs.to_dict()
    assert get_quantization_config(ModelConfig(load_in_4bit=True)).load_in_4bit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert get_kbit_device_map() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_kbit_device_map() == {"": 0}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_get_dataset_from_local_files_like_trl(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}", "id": i} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}", "extra": i} for i in range(4)])
    single = get_dataset(DatasetMixtureConfig(datasets=[{"path": "json", "data_files": a}]))
    assert list(single) == ["train"] and single["train"]["id"] == list(range(10))

    mixtures = [
        {
            "datasets": [
                {"path": "json", "data_files": a, "columns": ["text"]},
                {"path": "json", "data_files": b, "columns": ["text"]},
            ]
        },
        {"datasets": [{"path": "json", "data_files": f, "columns": ["text"], "fraction": 1.0} for f in (a, b)]},
        {"datasets": [{"path": "json", "data_files": a, "columns": ["text"]}], "test_split_size": 3},
    ]
    for mixture in mixtures:
        ours = get_dataset(DatasetMixtureConfig(**json.loads(json.dumps(mixture))))
        theirs = trl.get_dataset(trl.DatasetMixtureConfig(**json.loads(json.dumps(mixture))))
        assert {split: len(rows) for split, rows in ours.items()} == {s: len(r) for s, r in theirs.items()}
        if "test_split_size" not in mixture:  # the split is random
            assert ours["train"].to_list() == theirs["train"].to_list()
    # equal shares of a 10-row and a 4-row dataset: 4 rows of each, the first ones
    assert get_dataset(DatasetMixtureConfig(**mixtures[1]))["train"]["text"] == ["a0", "a1", "a2", "a3"] + [
        f"b{i}" for i in range(4)
    ]
    assert len(get_dataset(DatasetMixtureConfig(**mixtures[2]))["test"]) == 3

    with pytest.raises(ValueError, match="set it on all of them or none"):
        get_dataset(
            DatasetMixtureConfig(
                datasets=[{"path": "json", "data_files": a, "fraction": 0.5}, {"path": "json", "data_files": b}]
            )
        )
    with pytest.raises(ValueError, match="mixture is empty"):
        get_dataset(DatasetMixtureConfig())


def test_init_zero_verbose_routes_warnings_to_logging(monkeypatch, caplog):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    init_zero_verbose()
    with caplog.at_level(logging.WARNING):
        warnings.showwarning("careful", UserWarning, "script.py", 12)
    assert "script.py:12: UserWarning: careful" in caplog.text


def test_cli_trains_on_a_yaml_mixture_and_rejects_unknown_keys(tiny_model_path, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", zen_dataset("standard_language_modeling"))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_path}\ndatasets:\n  - path: json\n    data_files: {data}\n"
        "max_steps: 1\nreport_to: none\nbf16: false\nsave_strategy: 'no'\nlearning_rate: 0.5\n"
    )
    out = tmp_path / "out"
    cli_main(["sft", "--config", str(config), "--output_dir", str(out)])
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    with open(config, "a") as f:
        f.write("learning_rat: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", "--config", str(config), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert "unknown keys in the --config file: learning_rat (did you mean --learning_rate?)" in capsys.readouterr().err


def run_trl_script(name: str, args: list[str], cwd) -> None:
    """Copy TRL's `scripts/{name}.py`, switch its imports from trl to llm_trainer, and run it."""
    source = open(os.path.join(TRL_SCRIPTS, f"{name}.py")).read()
    script = re.sub(r"^(\s*)(from|import) trl\b", r"\1\2 llm_trainer", source, flags=re.MULTILINE)
    assert "from llm_trainer import" in script and not re.search(r"^\s*(from|import) trl\b", script, re.MULTILINE)
    (cwd / f"{name}.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--report_to", "none", "--save_strategy", "no", "--bf16", "false", "--learning_rate", "0.1"]
    result = subprocess.run(
        [sys.executable, f"{name}.py", *args, *common], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training completed" in result.stdout


def assert_trained(out, initial_path) -> None:
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(initial_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_trl_sft_script_runs_with_a_yaml_mixture(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", zen_dataset("standard_language_modeling"))
    (tmp_path / "sft.yaml").write_text(
        f"model_name_or_path: {tiny_model_path}\nmax_steps: 2\nper_device_train_batch_size: 4\n"
        f"datasets:\n  - path: json\n    data_files: {data}\n"
    )
    run_trl_script("sft", ["--config", "sft.yaml", "--output_dir", "out"], tmp_path)
    assert_trained(tmp_path / "out", tiny_model_path)


def test_trl_dpo_script_runs(tiny_model_path, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", zen_dataset("standard_preference"))
    args = ["--model_name_or_path", tiny_model_path, "--dataset_name", str(folder), "--output_dir", "out"]
    run_trl_script("dpo", [*args, "--max_steps", "2", "--per_device_train_batch_size", "4"], tmp_path)
    assert_trained(tmp_path / "out", tiny_model_path)


def test_trl_grpo_script_runs(tiny_model_path, tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", zen_dataset("standard_prompt_only"))
    (tmp_path / "my_rewards.py").write_text(
        "def letters(completions, **kwargs):\n    return [sum(c.isalpha() for c in t) / 8 for t in completions]\n"
    )
    args = ["--model_name_or_path", tiny_model_path, "--dataset_name", str(folder), "--output_dir", "out"]
    args += ["--reward_funcs", "think_format_reward", "my_rewards.letters", "--max_steps", "1"]
    args += ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4"]
    run_trl_script("grpo", args, tmp_path)
    assert_trained(tmp_path / "out", tiny_model_path)

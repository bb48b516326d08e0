"""Zero-edit migration: TRL 1.16's own `scripts/sft.py`, `dpo.py` and `grpo.py`, copied unmodified from the installed
trl wheel, train through `python -m llm_trainer.run` / `llm-trainer run` on llm_trainer's classes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_trainer.testing import zen_dataset

COMMON = ["--report_to", "none", "--save_strategy", "no", "--bf16", "false", "--learning_rate", "0.1"]
COMMON += ["--logging_steps", "1", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def trl_scripts() -> Path:
    """The `scripts/` folder of the installed trl wheel (found without importing trl)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "scripts"


def copy_script(trl_scripts: Path, name: str, folder: Path) -> Path:
    source = trl_scripts / f"{name}.py"
    shutil.copy(source, folder / source.name)
    assert (folder / source.name).read_text() == source.read_text()  # unmodified
    return folder / source.name


def write_dataset(folder: Path, config: str) -> str:
    """A local dataset folder, loadable by the scripts' `load_dataset(--dataset_name)`."""
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in zen_dataset(config):
            f.write(json.dumps(row) + "\n")
    return str(folder)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def llm_trainer_command() -> list[str]:
    """The `llm-trainer` console script of this environment, or its module form when it is not installed."""
    script = Path(sys.executable).with_name("llm-trainer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llm_trainer.cli"]


def assert_trained_on_llm_trainer(result: subprocess.CompletedProcess, out: Path, initial_path: str, config: str):
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training completed" in result.stdout and "'loss':" in result.stdout
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(initial_path)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    # The config the script built and the trainer saved is llm_trainer's class, imported through `from trl import`.
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert type(args).__module__ == f"llm_trainer.trainer.{config.lower()}_config"
    assert type(args).__name__ == f"{config}Config"


def test_trl_sft_script_runs_unmodified(trl_scripts, tiny_model_path, tmp_path):
    script = copy_script(trl_scripts, "sft", tmp_path)
    data = write_dataset(tmp_path / "lm", "standard_language_modeling")
    args = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", "out", "--max_steps", "2"]
    result = run([sys.executable, "-m", "llm_trainer.run", str(script), *args, *COMMON], tmp_path)
    assert_trained_on_llm_trainer(result, tmp_path / "out", tiny_model_path, "SFT")


def test_trl_dpo_script_runs_unmodified_through_the_cli(trl_scripts, tiny_model_path, tmp_path):
    copy_script(trl_scripts, "dpo", tmp_path)
    data = write_dataset(tmp_path / "pairs", "standard_preference")
    args = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", "out", "--max_steps", "2"]
    result = run([*llm_trainer_command(), "run", "dpo.py", *args, *COMMON], tmp_path)
    assert_trained_on_llm_trainer(result, tmp_path / "out", tiny_model_path, "DPO")


def test_trl_grpo_script_runs_unmodified(trl_scripts, tiny_model_path, tmp_path):
    copy_script(trl_scripts, "grpo", tmp_path)
    data = write_dataset(tmp_path / "prompts", "standard_prompt_only")
    # The script's reward registry (trl.rewards) and a dotted import path, which it resolves from the working dir.
    (tmp_path / "my_rewards.py").write_text(
        "def letters(completions, **kwargs):\n    return [sum(c.isalpha() for c in t) / 8 for t in completions]\n"
    )
    args = ["--model_name_or_path", tiny_model_path, "--dataset_name", data, "--output_dir", "out", "--max_steps", "1"]
    args += ["--reward_funcs", "think_format_reward", "my_rewards.letters"]
    args += ["--num_generations", "4", "--max_completion_length", "4"]
    result = run([sys.executable, "-m", "llm_trainer.run", "grpo.py", *args, *COMMON], tmp_path)
    assert_trained_on_llm_trainer(result, tmp_path / "out", tiny_model_path, "GRPO")


def test_a_trl_name_without_a_twin_fails_naming_it(tmp_path):
    (tmp_path / "script.py").write_text("from trl import (\n    ScriptArguments,\n    NoSuchTrainer,\n)\n")
    result = run([*llm_trainer_command(), "run", "script.py"], tmp_path)
    assert result.returncode != 0
    assert "MissingTwinError: `trl.NoSuchTrainer` has no llm_trainer twin yet" in result.stderr
    assert 'script.py", line 1' in result.stderr  # the traceback still points at the script's import

"""The shipped launch presets and `llm-trainer <algorithm> --accelerate_config NAME|PATH`.

The presets load as Accelerate configs and ship in the package; the CLI checks its flags, then relaunches itself
under `accelerate launch` with the preset and the process/machine layout, and says what it changed on a CPU-only
machine. SFT, DPO and GRPO launched that way on 2 CPU processes give the per-step losses of a 1-process run with
twice the per-device batch; the fsdp2 preset on CPU trains as DDP (Accelerate's fallback) and the trainer says so
with a `ShardingFallbackWarning`, which plain DDP (the multi_gpu preset) does not get.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from llm_trainer.accelerate_configs import PRESETS, preset_path
from llm_trainer.cli import main
from llm_trainer.distributed import ShardingFallbackWarning, sharding_fallback, warn_if_not_sharded
from llm_trainer.scripts import _training
from llm_trainer.testing import zen_dataset
from llm_trainer.trainer.utils import free_port

REWARDS = """
def length_reward(completions, **kwargs):
    return [float(len(str(completion))) for completion in completions]
"""

DATASETS = {
    "sft": "conversational_prompt_completion",
    "dpo": "conversational_preference",
    "grpo": "standard_prompt_only",
}
# GRPO decodes greedily: sampled completions depend on each process's RNG, so they would differ across layouts. A
# group's greedy completions are alike (zero advantages), so weight decay moves the policy off the reference and the
# KL term carries the loss and gradient from step 2 on (step 3: loss ~1e-2, gradient norm ~0.3).
EXTRA = {
    "grpo": [
        "--num_generations", "2", "--max_completion_length", "6", "--beta", "0.04", "--weight_decay", "1.0",
        "--learning_rate", "0.1", "--reward_funcs", "preset_rewards.length_reward",
        "--generation_kwargs", '{"do_sample": false}',
    ],
}  # fmt: skip
STEPS = {"sft": 2, "dpo": 2, "grpo": 3}
COMPARED = {  # per-step metrics that must match, beyond the loss
    "sft": ("grad_norm", "mean_token_accuracy", "num_tokens"),
    "dpo": ("grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"),
    "grpo": ("grad_norm", "kl", "reward", "completions/mean_length"),
}
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")


def _flags(algorithm: str, model: str, data: Path, out: Path, batch: int) -> list[str]:
    return [
        "--model_name_or_path", model, "--dataset_name", str(data / f"{algorithm}.jsonl"), "--output_dir", str(out),
        "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS[algorithm]), "--logging_steps", "1",
        "--learning_rate", "1e-2", "--seed", "3", "--bf16", "false", "--report_to", "none", "--save_strategy",
        "steps", "--save_steps", str(STEPS[algorithm]), "--disable_tqdm", "true", *EXTRA.get(algorithm, []),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The three datasets as JSONL files, and the GRPO reward module, in the folder the runs start from."""
    folder = tmp_path_factory.mktemp("preset-data")
    for algorithm, kind in DATASETS.items():
        with open(folder / f"{algorithm}.jsonl", "w") as f:
            for row in zen_dataset(kind):
                f.write(json.dumps(row) + "\n")
    (folder / "preset_rewards.py").write_text(REWARDS)
    return folder


def _steps(out: Path) -> list[dict]:
    (checkpoint,) = out.glob("checkpoint-*")  # saved at the last step, with the per-step logs at full precision
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def _one_process(algorithm: str, model: str, data: Path, out: Path, monkeypatch) -> list[dict]:
    monkeypatch.chdir(data)  # the reward module resolves from the working directory
    main([algorithm, *_flags(algorithm, model, data, out, batch=4)])
    return _steps(out)


def _launched(algorithm: str, preset: str, model: str, data: Path, out: Path) -> tuple[list[dict], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in (*LAUNCH_ENV, "LLM_TRAINER_LAUNCHED"):
        env.pop(name, None)
    launch = ["--accelerate_config", preset, "--num_processes", "2", "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "llm_trainer.cli", algorithm, *launch, *_flags(algorithm, model, data, out, 2)]
    done = subprocess.run(command, cwd=data, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return _steps(out), output


def _assert_same_steps(algorithm: str, ours: list[dict], reference: list[dict]) -> None:
    steps = list(range(1, STEPS[algorithm] + 1))
    assert [entry["step"] for entry in ours] == [entry["step"] for entry in reference] == steps
    for launched, single in zip(ours, reference):
        # The same global batch per step: a launch whose processes trained alone would be half as far into the data.
        assert launched["epoch"] == pytest.approx(single["epoch"])
        for key in ("loss", *COMPARED[algorithm]):
            # float32 sums over 2 vs 4 rows, then an all-reduce: a few ulps of the terms. Measured: SFT loss ~6.5 off
            # by <1e-6, DPO margins ~1e-3 (differences of ~6-sized rewards) by <3e-7, GRPO loss 3e-5 and 1e-2 by
            # <4e-12 and 2e-9 (its KL terms are small).
            tolerance = 1e-9 if algorithm == "grpo" else 1e-6
            assert launched[key] == pytest.approx(single[key], rel=2e-5, abs=tolerance), (key, launched, single)


def _run_and_compare(algorithm, preset, tiny_model_path, data, tmp_path, monkeypatch) -> str:
    ours, output = _launched(algorithm, preset, tiny_model_path, data, tmp_path / "launched")
    reference = _one_process(algorithm, tiny_model_path, data, tmp_path / "single", monkeypatch)
    _assert_same_steps(algorithm, ours, reference)
    # The command it ran, printed (matched from the package folder on: the launched CLI may be another checkout's).
    shipped = os.path.join(*preset_path(preset).parts[-2:])
    assert re.search(rf"--config_file \S*{re.escape(shipped)} --num_processes 2", output), output[-2000:]
    if not torch.cuda.is_available():
        on_cpu = "DeepSpeed runs on its CPU accelerator" if preset.startswith("zero") else "ACCELERATE_USE_CPU=true"
        assert on_cpu in output
    return output


# ----------------------------------------------------------------------------------------- launched runs
def test_sft_fsdp2_preset_on_cpu_warns_and_matches_one_process(tiny_model_path, data, tmp_path, monkeypatch):
    output = _run_and_compare("sft", "fsdp2", tiny_model_path, data, tmp_path, monkeypatch)
    if not torch.cuda.is_available():  # Accelerate trains FSDP-configured CPU runs as DDP: the trainer says so
        assert "ShardingFallbackWarning: FSDP2 (the accelerate config: ACCELERATE_USE_FSDP=true)" in output
        assert "NOT sharded: it trains with plain DDP over gloo on 2 CPU processes" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "preset"),
    [
        ("sft", "multi_gpu"),
        ("dpo", "fsdp2"),
        ("grpo", "multi_gpu"),
        pytest.param(  # on CPU: DeepSpeed's CPU accelerator (the CLI sets DS_ACCELERATOR=cpu, --ddp_backend gloo)
            "sft",
            "zero3",
            marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no DeepSpeed"),
        ),
    ],
)
def test_presets_match_one_process(algorithm, preset, tiny_model_path, data, tmp_path, monkeypatch):
    output = _run_and_compare(algorithm, preset, tiny_model_path, data, tmp_path, monkeypatch)
    assert ("ShardingFallbackWarning" in output) == (preset == "fsdp2" and not torch.cuda.is_available())


# ----------------------------------------------------------------------------------------- presets
def test_presets_ship_in_the_package_and_load_as_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    shipped = sorted(
        p.name for p in resources.files("llm_trainer.accelerate_configs").iterdir() if p.name.endswith(".yaml")
    )
    assert shipped == sorted(f"{name}.yaml" for name in PRESETS)
    expected = {
        "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp1": "FSDP", "fsdp2": "FSDP",
        "zero1": "DEEPSPEED", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
    }  # fmt: skip
    for name in PRESETS:
        config = load_config_from_file(str(preset_path(name)))
        assert config.distributed_type == DistributedType(expected[name]), name
        assert config.mixed_precision == "bf16"
    assert load_config_from_file(str(preset_path("fsdp2"))).fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(preset_path("fsdp1"))).fsdp_config["fsdp_version"] == 1
    for stage in (1, 2, 3):
        assert load_config_from_file(str(preset_path(f"zero{stage}"))).deepspeed_config["zero_stage"] == stage


# ----------------------------------------------------------------------------------------- the CLI's launch
def test_split_launch_arguments():
    launch, rest = _training.split_launch_arguments(
        ["--accelerate_config", "zero3", "--lr", "1", "--num_processes=4", "--machine_rank", "1", "--x"]
    )
    assert launch == {"accelerate_config": "zero3", "num_processes": 4, "machine_rank": 1}
    assert rest == ["--lr", "1", "--x"]
    with pytest.raises(ValueError, match="--num_processes expects an integer"):
        _training.split_launch_arguments(["--num_processes", "two"])
    with pytest.raises(ValueError, match="--accelerate_config needs a value"):
        _training.split_launch_arguments(["--accelerate_config", "--output_dir", "x"])


@pytest.mark.parametrize(
    ("value", "text", "message"),
    [
        (
            "zero4",
            None,
            "not a shipped preset nor a file. The shipped presets are: single_gpu, multi_gpu, fsdp1, fsdp2",
        ),
        ("configs/missing.yaml", None, "no such file"),
        ("bad.yaml", "a: [1,", "is not valid YAML"),
        ("train.yaml", "learning_rate: 1.0e-5\n", "is not an Accelerate config (it has no `distributed_type`)"),
    ],
)
def test_bad_accelerate_config_is_an_error_before_launching(
    value, text, message, monkeypatch, tiny_model_path, tmp_path
):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / value).write_text(text)
    launches = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launches.append)
    flags = ["--model_name_or_path", tiny_model_path, "--dataset_name", "d", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=f"llm-trainer sft: --accelerate_config {value}:? {re.escape(message)}"):
        main(["sft", "--accelerate_config", value, *flags])
    assert not launches


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(_training, "visible_gpus", lambda: count)


def test_launch_arguments_on_a_cpu_only_machine(monkeypatch):
    _gpus(monkeypatch, 0)
    arguments, env, training, notes = _training.launch_arguments({"accelerate_config": "fsdp2"})
    assert arguments[:2] == ["--config_file", str(preset_path("fsdp2"))]
    assert arguments[2:] == ["--num_processes", "1", "--mixed_precision", "no"]
    assert env == {"ACCELERATE_USE_CPU": "true"} and training == []  # else each process trains alone
    assert any("Accelerate does NOT apply FSDP on CPU" in note for note in notes)


def test_deepspeed_presets_on_a_cpu_only_machine(monkeypatch):
    _gpus(monkeypatch, 0)
    installed = importlib.util.find_spec("deepspeed") is not None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "deepspeed" else object())
    with pytest.raises(
        ValueError, match=r"zero3 uses DeepSpeed, which is not installed: pip install 'llm-trainer\[deepspeed\]'"
    ):
        _training.launch_arguments({"accelerate_config": "zero3"})
    monkeypatch.undo()
    _gpus(monkeypatch, 0)
    if installed:  # DeepSpeed's CPU accelerator with gloo; `use_cpu` would turn DeepSpeed off
        arguments, env, training, _ = _training.launch_arguments({"accelerate_config": "zero2", "num_processes": 2})
        assert env == {"DS_ACCELERATOR": "cpu"} and training == ["--ddp_backend", "gloo"]
        assert arguments[2:] == ["--num_processes", "2", "--mixed_precision", "no"]


def test_launch_arguments_with_gpus_and_two_machines(monkeypatch, tmp_path):
    _gpus(monkeypatch, 4)
    layout = {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1", "main_process_port": 29555}
    arguments, env, training, _ = _training.launch_arguments({"accelerate_config": "multi_gpu", **layout})
    assert env == {} and training == [] and "--mixed_precision" not in arguments
    assert arguments == [
        "--config_file", str(preset_path("multi_gpu")), "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29555", "--num_processes", "8",
    ]  # fmt: skip
    own = tmp_path / "mine.yaml"  # a user's file keeps its own process count
    own.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 3, "mixed_precision": "no"}))
    arguments, _, _, notes = _training.launch_arguments({"accelerate_config": str(own)})
    assert arguments == ["--config_file", str(own)] and notes == []


def test_cli_relaunches_under_accelerate_launch(tiny_model_path, tmp_path, monkeypatch):
    for name in (*LAUNCH_ENV, "LLM_TRAINER_LAUNCHED"):  # restored afterwards: `relaunch` sets some of them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    _gpus(monkeypatch, 2)
    launches = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launches.append)
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_path}\naccelerate_config: fsdp2\nnum_machines: 2\n")
    training = ["--config", str(config), "--dataset_name", "trl-lib/Capybara", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--num_processes", "4", *training[:2], "--main_process_ip", "10.1.1.1", *training[2:]])
    assert exit_info.value.code == 0
    (args,) = launches
    assert args.config_file == str(preset_path("fsdp2"))  # from the YAML; flags win over its keys
    assert (args.num_processes, args.num_machines, args.main_process_ip) == (4, 2, "10.1.1.1")
    assert args.module and args.training_script == "llm_trainer.cli"
    assert args.training_script_args == ["dpo", *training]  # the launch flags stripped, the rest as given
    assert os.environ["LLM_TRAINER_LAUNCHED"] == "1"
    monkeypatch.delenv("LLM_TRAINER_LAUNCHED")
    launches.clear()
    with pytest.raises(SystemExit) as exit_info:  # bad training flags fail here, before anything is launched
        main(["sft", "--accelerate_config", "multi_gpu", "--not_a_flag", "1", *training])
    assert exit_info.value.code == 2 and not launches


def test_relaunch_refused_inside_a_launched_process(tiny_model_path, monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_TRAINER_LAUNCHED", "1")  # as in a process `relaunch` started
    with pytest.raises(SystemExit, match="this process was already launched"):
        main(["sft", "--accelerate_config", "multi_gpu", "--model_name_or_path", tiny_model_path,
              "--dataset_name", "d", "--output_dir", str(tmp_path)])  # fmt: skip


# ----------------------------------------------------------------------------------------- the warning
def _accelerator(kind: str, processes: int = 2) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=DistributedType(kind), num_processes=processes, is_local_main_process=True)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
        "FSDP_VERSION",
        "WORLD_SIZE",
        "ACCELERATE_USE_CPU",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


def test_warning_fires_when_fsdp_or_zero_falls_back(clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "2")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.warns(ShardingFallbackWarning, match=r"FSDP2 .* NOT sharded: it trains with plain DDP over gloo"):
        message = warn_if_not_sharded(_accelerator("MULTI_CPU"), SimpleNamespace(fsdp=None, deepspeed=None))
    assert "no GPU" in message
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        assert warn_if_not_sharded(_accelerator("MULTI_CPU"), None) == message
    args = SimpleNamespace(fsdp=True, deepspeed="ds.json", use_cpu=True)
    clean_env.delenv("ACCELERATE_USE_FSDP")
    message = sharding_fallback(_accelerator("NO", 1), args)
    assert "FSDP (TrainingArguments.fsdp=True) and DeepSpeed ZeRO (TrainingArguments.deepspeed=ds.json)" in message
    assert "launched as 2 processes, but each one trains ALONE" in message  # WORLD_SIZE 2, one process seen


def test_no_warning_for_plain_ddp_or_a_sharded_run(clean_env):
    assert sharding_fallback(_accelerator("MULTI_CPU"), SimpleNamespace(fsdp=None, deepspeed=None)) is None
    assert sharding_fallback(_accelerator("NO", 1), None) is None
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_fallback(_accelerator("FSDP"), None) is None
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharding_fallback(_accelerator("DEEPSPEED"), None) is None

"""The one implementation behind every training script: `llm_trainer.scripts.<name>` and `llm-trainer <name>`.

Every algorithm of `llm_trainer.registry` runs from flags. `make_parser(name)` builds the script's `TrlParser` over
TRL's four dataclasses (script arguments, the trainer's config, `ModelConfig`, `DatasetMixtureConfig`); `main(name,
...)` loads the data, builds what the trainer needs beyond the model and datasets (`trainer_inputs`: reward functions,
a teacher, a student, PPO's reward model and tokenized prompts) and trains, as TRL's script of that name does. Bad
input raises
`ScriptArgumentError` (a `ValueError`, TRL's type) or `RewardImportError` before training; the CLI turns both into a
one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..registry import ALGORITHMS
from .utils import DatasetMixtureConfig, ScriptArguments, TrlParser, get_dataset, load_data_file

if TYPE_CHECKING:
    from ..trainer.model_config import ModelConfig

__all__ = [
    "LAUNCH_FLAGS",
    "TRAINERS",
    "GRPOScriptArguments",
    "OnlineScriptArguments",
    "RLOOScriptArguments",
    "RewardImportError",
    "ScriptArgumentError",
    "TeacherGRPOScriptArguments",
    "launch_arguments",
    "launched",
    "main",
    "make_parser",
    "relaunch",
    "resolve_accelerate_config",
    "reward_functions",
    "split_launch_arguments",
    "trainer_inputs",
]

TRAINERS = sorted(name for name, algorithm in ALGORITHMS.items() if algorithm.cli)  # the `llm-trainer` commands


class ScriptArgumentError(ValueError):
    """A training script was given input it cannot train on (no dataset, an unknown reward function, ...)."""


class RewardImportError(ImportError):
    """A `--reward_funcs` import path names a module or function that cannot be imported."""


@dataclass
class OnlineScriptArguments(ScriptArguments):
    """`ScriptArguments`, plus the reward options of the online trainers' scripts (`grpo`, `rloo`)."""

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification reward model (Hub id or local folder), scored first."},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: names from `llm_trainer.rewards` (accuracy_reward, reasoning_accuracy_reward, "
            "think_format_reward, get_soft_overlong_punishment with max_completion_len=1280 and "
            "soft_punish_cache=256) or import paths (`my_module.my_reward`, resolved from the working directory)."
        },
    )


@dataclass
class GRPOScriptArguments(OnlineScriptArguments):
    """Script arguments of the `grpo` script: `ScriptArguments` plus `reward_model_name_or_path` and `reward_funcs`."""


@dataclass
class RLOOScriptArguments(OnlineScriptArguments):
    """Script arguments of the `rloo` script: `ScriptArguments` plus `reward_model_name_or_path` and `reward_funcs`."""


@dataclass
class OnlineDPOScriptArguments(OnlineScriptArguments):
    """Script arguments of the `online_dpo` script: `ScriptArguments` plus `reward_model_name_or_path` and
    `reward_funcs` (optional with `--reward_model_path`)."""


@dataclass
class TeacherGRPOScriptArguments(OnlineScriptArguments):
    """`teacher_grpo`'s (the model is the teacher): rewards optional (`AdaptiveTeachingReward`), and the student."""

    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The frozen student (default: a copy)."}
    )


SCRIPT_ARGUMENTS = {
    "async_grpo": GRPOScriptArguments,
    "grpo": GRPOScriptArguments,
    "online_dpo": OnlineDPOScriptArguments,
    "nash_md": OnlineDPOScriptArguments,
    "xpo": OnlineDPOScriptArguments,
    "rloo": RLOOScriptArguments,
    "teacher_grpo": TeacherGRPOScriptArguments,
}


def _dataclass_types(name: str) -> tuple[type, ...]:
    """The four dataclasses the `name` script parses into, in TRL's order."""
    from ..trainer.model_config import ModelConfig

    if name not in TRAINERS:
        raise ValueError(f"Unknown training script {name!r}: expected one of {TRAINERS}.")
    config = ALGORITHMS[name].trainer_class().config_class
    config = vars(config).get("script_config_class") or config  # a variant whose flags do not clash with ModelConfig's
    return (SCRIPT_ARGUMENTS.get(name, ScriptArguments), config, ModelConfig, DatasetMixtureConfig)


def make_parser(
    name: str,
    subparsers: argparse._SubParsersAction | None = None,
    prog: str | None = None,
    **kwargs: Any,
) -> TrlParser:
    """The `name` script's parser: standalone (with `prog` and any other `ArgumentParser` keywords), or added as the
    `name` command to `subparsers` of a `TrlParser`-based CLI."""
    dataclass_types = _dataclass_types(name)
    if subparsers is not None:
        return subparsers.add_parser(
            name, help=f"Run the {name} training script", dataclass_types=dataclass_types, **kwargs
        )
    return TrlParser(dataclass_types, prog=prog, **kwargs)


def reward_functions(script_args: OnlineScriptArguments, required: bool = True) -> list:
    """The reward model and functions named by `--reward_model_name_or_path` / `--reward_funcs`, in that order; at
    least one when `required`."""
    from .. import rewards

    registry = {
        "accuracy_reward": rewards.accuracy_reward,
        "reasoning_accuracy_reward": rewards.reasoning_accuracy_reward,
        "think_format_reward": rewards.think_format_reward,
        "get_soft_overlong_punishment": rewards.get_soft_overlong_punishment(1280, 256),
    }
    funcs: list = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    for name in script_args.reward_funcs or []:
        if name in registry:
            funcs.append(registry[name])
        elif "." in name:
            module, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module), attribute))
            except (ImportError, AttributeError) as error:
                raise RewardImportError(
                    f"Cannot load the reward function {name!r}: {error}. Pass `module.function` importable from "
                    f"{os.getcwd()} (e.g. `my_rewards.length` for a function `length` in my_rewards.py there), or one "
                    f"of {sorted(registry)}."
                ) from None
        else:
            raise ScriptArgumentError(
                f"Unknown reward function {name!r}: use one of {sorted(registry)} or an import path. "
                f"(Could not load reward function {name!r}.)"
            )
    if not funcs and required:
        raise ScriptArgumentError("GRPO/RLOO need --reward_funcs and/or --reward_model_name_or_path.")
    return funcs


def trainer_inputs(name: str, script_args: ScriptArguments, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What the `name` trainer takes beyond the model, config, datasets and PEFT config, from the parsed flags;
    raises `ScriptArgumentError` (or `RewardImportError`) before anything is loaded when one is missing."""
    if name in ("grpo", "rloo", "async_grpo"):
        return {"reward_funcs": reward_functions(script_args)}
    if name in ("online_dpo", "xpo", "nash_md"):  # `--reward_model_path` (a config field) is a reward source too
        rewards = reward_functions(script_args, required=training_args.reward_model_path is None)
        return {"reward_funcs": rewards or None}
    if name == "teacher_grpo":
        rewards = reward_functions(script_args, required=False)
        return {"reward_funcs": rewards or None, "student_model": script_args.student_model_name_or_path}
    if name in ("distillation", "gkd") and training_args.teacher_model_name_or_path is None:
        raise ScriptArgumentError(
            f"A teacher model is required for {name} training. Set it with `--teacher_model_name_or_path`."
        )
    if name == "ppo":  # TRL's PPO script: the reward model (and the value model's start) from `--reward_model_path`
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        return {"reward_model": training_args.reward_model_path, "ref_model": None, "processing_class": tokenizer}
    return {}


def _tokenized_prompts(dataset: Any, tokenizer: Any) -> Any:
    """PPO's dataset: its `prompt` column (text, or messages through the chat template) as `input_ids`."""
    from ..data.tokenization import tokenize

    columns = (dataset.column_names or []) if dataset is not None else ["input_ids"]
    if "input_ids" in columns:
        return dataset
    if "prompt" not in columns:
        raise ScriptArgumentError("PPO trains on prompts: the dataset needs a 'prompt' (or an 'input_ids') column.")
    return dataset.map(
        lambda row: {"input_ids": tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]},
        remove_columns=columns,
    )


def _load_datasets(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig, evaluating: bool):
    """The dataset splits to train (and evaluate) on: the `datasets:` mixture, a local file, or `--dataset_name`."""
    from ..trainer.simple import load_named_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            warnings.warn(
                "Both `datasets` and `dataset_name` are provided: training on `datasets`, ignoring `dataset_name`.",
                stacklevel=3,
            )
        return get_dataset(dataset_args)
    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    if os.path.isfile(name) and evaluating:
        raise ScriptArgumentError(
            f"--dataset_name {name} is a single file, so there is no '{script_args.dataset_test_split}' split to "
            "evaluate on. Set --eval_strategy no, or list the files in a `datasets:` mixture in the --config YAML "
            "with `test_split_size`."
        )
    try:
        if os.path.isfile(name):
            return {script_args.dataset_train_split: load_data_file(name, streaming)}
        return load_named_dataset(name, name=script_args.dataset_config, streaming=streaming)
    except (FileNotFoundError, ValueError) as error:
        raise ScriptArgumentError(f"--dataset_name: {error}") from None


def main(
    name: str,
    script_args: ScriptArguments,
    training_args: Any,
    model_args: Any,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train with the `name` trainer on parsed arguments and save the model to `training_args.output_dir`."""
    import torch
    from accelerate import PartialState

    import llm_trainer

    from ..trainer.utils import get_kbit_device_map, get_peft_config, get_quantization_config

    dataset_args = dataset_args if dataset_args is not None else DatasetMixtureConfig()
    if not model_args.model_name_or_path or not (script_args.dataset_name or dataset_args.datasets):
        missing = "" if model_args.model_name_or_path else " --model_name_or_path is not set."
        if not (script_args.dataset_name or dataset_args.datasets):
            missing += " Either `datasets` or `dataset_name` must be provided."
        raise ScriptArgumentError(
            "--model_name_or_path and --dataset_name are required (or, instead of --dataset_name, a `datasets:` "
            f"list in the --config YAML).{missing}"
        )
    extra = trainer_inputs(name, script_args, training_args, model_args)
    evaluating = training_args.eval_strategy != "no"
    dataset = _load_datasets(script_args, dataset_args, evaluating)

    init_kwargs = {"attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype}
    if name in ("distillation", "gkd"):  # the teacher loads like the student; its revision comes from the config
        training_args.teacher_model_init_kwargs = {**init_kwargs, **(training_args.teacher_model_init_kwargs or {})}
    init_kwargs["revision"] = model_args.model_revision
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        init_kwargs |= {"quantization_config": quantization_config, "device_map": get_kbit_device_map()}
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}

    splits = [
        dataset[script_args.dataset_train_split],
        dataset[script_args.dataset_test_split] if evaluating else None,
    ]
    if name == "ppo":
        splits = [_tokenized_prompts(split, extra["processing_class"]) for split in splits]
    trainer = getattr(llm_trainer, ALGORITHMS[name].trainer)(
        model=model_args.model_name_or_path,
        **extra,
        args=training_args,
        train_dataset=splits[0],
        eval_dataset=splits[1],
        peft_config=get_peft_config(model_args),
    )
    if script_args.ignore_bias_buffers:  # DDP cannot broadcast boolean buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            buffer_name for buffer_name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    state = PartialState()
    state.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    state.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        state.print(f"Model pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank's in-flight collectives finish (and gloo's worker threads let go of their tensors, which needs
        # the GIL this barrier's wait releases) before the group is torn down: tearing it down while a gloo thread
        # still frees a finished all-gather deadlocks on the GIL, and the launcher then waits forever.
        torch.distributed.barrier()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, leave the process group
        trainer.end()


def script_entry_points(name: str) -> tuple[Callable[..., None], Callable[..., TrlParser]]:
    """`(main, make_parser)` for the `name` script module, with TRL's signatures, bound to the shared implementation."""

    def script_main(
        script_args: ScriptArguments,
        training_args: Any,
        model_args: ModelConfig,
        dataset_args: DatasetMixtureConfig | None = None,
    ) -> None:
        main(name, script_args, training_args, model_args, dataset_args)

    def script_make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
        return make_parser(name, subparsers, prog)

    script_main.__doc__ = f"Train with {name} on parsed arguments (see `make_parser`); save to `output_dir`."
    script_make_parser.__doc__ = f"The `{name}` script's `TrlParser`: standalone, or a command added to `subparsers`."
    for function, public in ((script_main, "main"), (script_make_parser, "make_parser")):
        function.__name__ = public
        function.__qualname__ = public
        function.__module__ = f"{__package__}.{name}"
    return script_main, script_make_parser


def run_script(name: str) -> None:
    """`python -m llm_trainer.scripts.<name>`: parse the command line (unknown YAML keys ignored, as TRL) and train."""
    main_function, parser_function = script_entry_points(name)
    main_function(*parser_function().parse_args_and_config(fail_with_unknown_args=False))


# ------------------------------------------------------------------------------------------ accelerate launch
LAUNCH_FLAGS: dict[str, type] = {
    "accelerate_config": str,
    "num_processes": int,
    "num_machines": int,
    "machine_rank": int,
    "main_process_ip": str,
    "main_process_port": int,
}
"""The `llm-trainer <algorithm>` flags that go to `accelerate launch` instead of the trainer (also as `--config`
YAML keys): a preset name or config file, and the process / machine layout."""


def split_launch_arguments(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`argv` split into the launch flags (`LAUNCH_FLAGS`, as `--flag value` or `--flag=value`, converted to their
    type) and everything else, in order. A launch flag without a value or with a bad value raises
    `ScriptArgumentError` naming it."""
    launch: dict[str, Any] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        flag, has_value, value = token.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name not in LAUNCH_FLAGS:
            rest.append(token)
            index += 1
            continue
        if not has_value:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise ScriptArgumentError(f"--{name} needs a value.")
            value = argv[index + 1]
            index += 1
        launch[name] = _launch_value(name, value)
        index += 1
    return launch, rest


def _launch_value(name: str, value: Any) -> Any:
    try:
        return LAUNCH_FLAGS[name](value)
    except (TypeError, ValueError):
        raise ScriptArgumentError(f"--{name} expects an integer, got {value!r}.") from None


def resolve_accelerate_config(value: str) -> str:
    """The config file `--accelerate_config value` names: an existing file path, or a shipped preset's name (with or
    without `.yaml`). Raises `ScriptArgumentError` listing the presets for an unknown name, or naming a missing file."""
    from ..accelerate_configs import PRESETS, preset_path

    if os.path.isfile(value):
        return value
    name = value.removesuffix(".yaml").removesuffix(".yml")
    if name in PRESETS and os.sep not in value:
        return str(preset_path(name))
    if os.sep in value or value.endswith((".yaml", ".yml", ".json")):
        raise ScriptArgumentError(
            f"--accelerate_config {value}: no such file. Pass an existing accelerate config file or one of the "
            f"shipped presets: {', '.join(PRESETS)}."
        )
    raise ScriptArgumentError(
        f"--accelerate_config {value}: not a shipped preset nor a file. The shipped presets are: "
        f"{', '.join(PRESETS)} (or pass the path of your own accelerate config file)."
    )


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_arguments(launch: dict[str, Any]) -> tuple[list[str], dict[str, str], list[str], list[str]]:
    """`(accelerate launch arguments, environment variables to set, training flags to add, notes)` for the launch
    flags `launch`; `notes` says, in words, everything changed from what was asked.

    The shipped presets are written for one node of 8 GPUs: without `--num_processes`, the visible GPU count (times
    `--num_machines`) is used instead. On a machine without a GPU, mixed precision is turned off (the presets' bf16
    autocast is slow on CPU and changes the numbers), and the processes are told to use the CPU: for DDP and FSDP
    presets with `ACCELERATE_USE_CPU=true` (gloo; without it Accelerate leaves every launched process training
    alone, and it trains FSDP presets as DDP), for DeepSpeed ones with `DS_ACCELERATOR=cpu` and `--ddp_backend gloo`
    (DeepSpeed's CPU accelerator; `use_cpu` would turn DeepSpeed off). A DeepSpeed preset without DeepSpeed installed
    is an error naming the install.
    """
    import importlib.util

    import yaml

    from ..accelerate_configs import PRESETS

    value = launch.get("accelerate_config")
    config_file = resolve_accelerate_config(value) if value is not None else None
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file) as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ScriptArgumentError(f"--accelerate_config {value} is not valid YAML: {error}") from None
        if not isinstance(config, dict) or "distributed_type" not in config:
            raise ScriptArgumentError(
                f"--accelerate_config {value} is not an Accelerate config (it has no `distributed_type`): write one "
                "with `accelerate config`, or copy a shipped preset (`llm_trainer.accelerate_configs.preset_path`). "
                "Training settings go in --config."
            )
    kind = config.get("distributed_type")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ScriptArgumentError(
            f"--accelerate_config {value} uses DeepSpeed, which is not installed: pip install "
            "'llm-trainer[deepspeed]' (or pip install deepspeed)."
        )
    shipped = value is not None and value.removesuffix(".yaml") in PRESETS and not os.path.isfile(value)
    gpus = visible_gpus()
    notes: list[str] = []
    env: dict[str, str] = {}
    training_flags: list[str] = []
    layout = dict(launch)
    layout.pop("accelerate_config", None)
    if shipped and "num_processes" not in layout:
        machines = layout.get("num_machines", config.get("num_machines", 1))
        layout["num_processes"] = max(gpus, 1) * machines
        what = f"{gpus} visible GPU(s)" if gpus else "no GPU: one CPU process; pass --num_processes N for N"
        notes.append(f"--num_processes {layout['num_processes']} ({what})")
    if not gpus:
        if kind == "DEEPSPEED":
            env["DS_ACCELERATOR"] = "cpu"
            training_flags = ["--ddp_backend", "gloo"]
            notes.append(
                "no GPU: DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, --ddp_backend gloo unless given); "
                "its first launch on a machine compiles a comm op (minutes)"
            )
        else:
            env["ACCELERATE_USE_CPU"] = "true"
            notes.append("no GPU: the processes train on CPU (ACCELERATE_USE_CPU=true, gloo)")
        if config.get("mixed_precision", "no") != "no" and "mixed_precision" not in layout:
            notes.append(f"--mixed_precision no (the config's {config['mixed_precision']} autocast is GPU-only here)")
            layout["mixed_precision"] = "no"
        if kind in ("FSDP", "MEGATRON_LM"):
            notes.append(
                f"Accelerate does NOT apply {kind} on CPU: this run is plain DDP, every process holding the whole "
                "model (the trainer warns too)"
            )
    arguments = ["--config_file", config_file] if config_file is not None else []
    for name, setting in layout.items():
        arguments += [f"--{name}", str(setting)]
    return arguments, env, training_flags, notes


def launched() -> bool:
    """Whether this process was started by a launcher (`accelerate launch`, `torchrun`, or `relaunch`)."""
    return "LOCAL_RANK" in os.environ or "LLM_TRAINER_LAUNCHED" in os.environ


def relaunch(name: str, launch: dict[str, Any], argv: list[str]) -> None:
    """Run `llm-trainer name argv` again under `accelerate launch` with the launch flags `launch` (`launch_arguments`):
    one process per device, on this and (with `--num_machines`) the other machines. Raises `SystemExit` with the
    launch's exit status."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if launched():
        raise ScriptArgumentError(
            f"--{next(iter(launch))} relaunches llm-trainer under `accelerate launch`, but this process was already "
            "launched (LOCAL_RANK or LLM_TRAINER_LAUNCHED is set). Drop the launch flags, or run `llm-trainer` directly instead of through "
            "accelerate launch / torchrun."
        )
    arguments, env, training_flags, notes = launch_arguments(launch)
    for flag, setting in zip(training_flags[::2], training_flags[1::2]):
        if not any(arg == flag or arg.startswith(f"{flag}=") for arg in argv):
            argv = [*argv, flag, setting]
    os.environ.update(env)
    os.environ["LLM_TRAINER_LAUNCHED"] = "1"  # a nested `--accelerate_config` in the children is an error
    command = [*arguments, "--module", "llm_trainer.cli", name, *argv]
    print(f"llm-trainer {name}: accelerate launch {' '.join(command)}", file=sys.stderr, flush=True)
    for note in notes:
        print(f"llm-trainer {name}: {note}", file=sys.stderr, flush=True)
    launch_command(launch_command_parser().parse_args(command))
    raise SystemExit(0)

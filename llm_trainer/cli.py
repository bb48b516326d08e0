"""`llm-trainer`: train from the command line, TRL-CLI style.

    llm-trainer sft|dpo|kto|orpo|cpo|grpo|rloo|reward|distillation --model_name_or_path ... --dataset_name ... --output_dir out
    llm-trainer sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --output_dir out
    llm-trainer sft --config run.yaml --learning_rate 1e-5     # flags override the YAML
    llm-trainer grpo ... --reward_funcs think_format_reward my_rewards.length_reward  # names or import paths
    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B           # a generation server for `vllm_mode="server"`
    llm-trainer run my_trl_script.py --flag value ...          # an unmodified TRL script, run on llm_trainer
    llm-trainer env                                            # versions, for bug reports
    llm-trainer demo                                           # the offline SFT demo

Every field of the trainer's config, of `ModelConfig` and of `ScriptArguments` is a flag (`llm-trainer sft --help`
lists them). A YAML `--config` file sets defaults for any flag, its optional `env:` mapping sets environment
variables, and a `datasets:` list (see `DatasetMixtureConfig`) trains on a mixture instead of `--dataset_name`.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from .scripts.utils import DatasetMixtureConfig, ScriptArguments, TrlParser, get_dataset, load_data_file
from .trainer.model_config import ModelConfig

# Trainers of causal LMs whose constructor takes (model, args, train_dataset, eval_dataset, peft_config)
TRAINERS = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
    "orpo": ("ORPOConfig", "ORPOTrainer"),
    "cpo": ("CPOConfig", "CPOTrainer"),
    "grpo": ("GRPOConfig", "GRPOTrainer"),
    "rloo": ("RLOOConfig", "RLOOTrainer"),
    "reward": ("RewardConfig", "RewardTrainer"),  # a sequence-classification head with one label on the LM
    "distillation": ("DistillationConfig", "DistillationTrainer"),  # the teacher: --teacher_model_name_or_path
}
ONLINE = {"grpo", "rloo"}  # trainers that also take reward functions


@dataclass
class TrainScriptArguments(ScriptArguments):
    """`ScriptArguments`, plus the reward options of TRL's `grpo` / `rloo` scripts."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "GRPO/RLOO reward functions: names from `llm_trainer.rewards` (accuracy_reward, "
            "reasoning_accuracy_reward, think_format_reward, get_soft_overlong_punishment) or import paths "
            "(`my_module.my_reward`, resolved from the working directory)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "GRPO/RLOO: a sequence-classification reward model, scored first."}
    )


def train(name: str, argv: list[str]) -> None:
    """Run the `name` trainer with arguments parsed from `argv`, as TRL's script of that name does."""
    import torch

    import llm_trainer

    from .trainer.simple import load_named_dataset
    from .trainer.utils import get_kbit_device_map, get_peft_config, get_quantization_config

    config_name, trainer_name = TRAINERS[name]
    parser = TrlParser(
        (TrainScriptArguments, getattr(llm_trainer, config_name), ModelConfig, DatasetMixtureConfig),
        prog=f"llm-trainer {name}",
        usage=f"llm-trainer {name} [--config run.yaml] [--flag value ...]  (`llm-trainer {name} --help` lists the flags)",
    )
    try:
        script, config, model_args, mixture, config_unknown, unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (OSError, TypeError, ValueError) as error:  # the --config file, or a value a config rejects
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(parser, unknown)}")
    if config_unknown:
        keys = ", ".join(key.removeprefix("--") for key in config_unknown[::2])
        parser.error(f"unknown keys in the --config file: {keys}{_did_you_mean(parser, config_unknown[::2])}")
    if not model_args.model_name_or_path or not (script.dataset_name or mixture.datasets):
        raise SystemExit(
            f"llm-trainer {name}: --model_name_or_path and --dataset_name are required (or, instead of "
            "--dataset_name, a `datasets:` list in the --config YAML)."
        )
    extra = {"reward_funcs": reward_functions(script)} if name in ONLINE else {}
    evaluating = config.eval_strategy != "no"
    if mixture.datasets:
        if script.dataset_name:
            warnings.warn("Both `datasets` and --dataset_name are set: training on `datasets`.", stacklevel=2)
        dataset = get_dataset(mixture)
    elif os.path.isfile(script.dataset_name):
        if evaluating:
            raise SystemExit(
                f"llm-trainer {name}: --dataset_name {script.dataset_name} is a single file, so there is no "
                f"'{script.dataset_test_split}' split to evaluate on. Set --eval_strategy no, or list the files in a "
                "`datasets:` mixture in the --config YAML with `test_split_size`."
            )
        try:
            dataset = {script.dataset_train_split: load_data_file(script.dataset_name, script.dataset_streaming)}
        except ValueError as error:
            raise SystemExit(f"llm-trainer {name}: --dataset_name: {error}") from None
    else:
        try:
            dataset = load_named_dataset(
                script.dataset_name, name=script.dataset_config, streaming=script.dataset_streaming
            )
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"llm-trainer {name}: --dataset_name: {error}") from None
    init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        init_kwargs |= {"quantization_config": quantization_config, "device_map": get_kbit_device_map()}
    config.model_init_kwargs = {**init_kwargs, **(config.model_init_kwargs or {})}
    trainer = getattr(llm_trainer, trainer_name)(
        model=model_args.model_name_or_path,
        **extra,
        args=config,
        train_dataset=dataset[script.dataset_train_split],
        eval_dataset=dataset[script.dataset_test_split] if evaluating else None,
        peft_config=get_peft_config(model_args),
    )
    if script.ignore_bias_buffers:  # DDP cannot broadcast boolean buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            buffer_name for buffer_name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)


def _did_you_mean(parser: TrlParser, unknown: list[str]) -> str:
    """A hint, ` (did you mean --x?)`, for the first unknown flag close to a known one; empty when none is."""
    import difflib

    known = [option for action in parser._actions for option in action.option_strings]
    for flag in unknown:
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def reward_functions(script: TrainScriptArguments) -> list:
    """The reward model and functions named on the command line, TRL's `grpo` script style."""
    import importlib

    from . import rewards

    registry = {
        "accuracy_reward": rewards.accuracy_reward,
        "reasoning_accuracy_reward": rewards.reasoning_accuracy_reward,
        "think_format_reward": rewards.think_format_reward,
        "get_soft_overlong_punishment": rewards.get_soft_overlong_punishment(1280, 256),
    }
    funcs: list = [script.reward_model_name_or_path] if script.reward_model_name_or_path else []
    for name in script.reward_funcs or []:
        if name in registry:
            funcs.append(registry[name])
        elif "." in name:
            module, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module), attribute))
            except (ImportError, AttributeError) as error:
                raise SystemExit(
                    f"Cannot load the reward function {name!r}: {error}. Pass `module.function` importable from "
                    f"{os.getcwd()} (e.g. `my_rewards.length` for a function `length` in my_rewards.py there), or one "
                    f"of {sorted(registry)}."
                ) from None
        else:
            raise SystemExit(f"Unknown reward function {name!r}: use one of {sorted(registry)} or an import path.")
    if not funcs:
        raise SystemExit("GRPO/RLOO need --reward_funcs and/or --reward_model_name_or_path.")
    return funcs


def env() -> str:
    """Versions of Python, llm_trainer and the libraries it runs on."""
    import torch

    def ver(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from .scripts.utils import get_git_commit_hash

    devices = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    commit = get_git_commit_hash("llm_trainer")
    ours = ver("llm-trainer") + (f"+{commit[:7]}" if commit and not commit.startswith("Error") else "")
    lines = [f"Platform: {platform.platform()}", f"Python version: {platform.python_version()}"]
    lines += [f"llm_trainer version: {ours}", f"PyTorch version: {torch.__version__}"]
    lines += [f"Devices: {devices}"]
    for package in ("transformers", "accelerate", "datasets", "peft", "triton", "deepspeed", "vllm"):
        lines.append(f"{package} version: {ver(package)}")
    lines.append(f"TRL version: {ver('trl')}")  # TRL's own label, which its bug-report tooling looks for
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = [*TRAINERS, "env", "demo", "vllm-serve", "run"]
    if not argv or argv[0] not in commands:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "env":
        print(env())
    elif command == "demo":
        from .demo import main as demo

        demo(rest)
    elif command == "run":
        from .run import run

        run(rest)
    elif command == "vllm-serve":
        from .scripts.vllm_serve import cli as vllm_serve

        vllm_serve(rest)
    else:
        train(command, rest)


if __name__ == "__main__":
    main()

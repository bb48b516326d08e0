"""`llm-trainer`: train from the command line, TRL-CLI style.

    llm-trainer sft|dpo|kto|orpo|cpo|grpo|rloo --model_name_or_path ... --dataset_name ... --output_dir out
    llm-trainer sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --output_dir out
    llm-trainer sft --config run.yaml --learning_rate 1e-5     # flags override the YAML
    llm-trainer grpo ... --reward_funcs think_format_reward my_rewards.length_reward  # names or import paths
    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B           # a generation server for `vllm_mode="server"`
    llm-trainer env                                            # versions, for bug reports
    llm-trainer demo                                           # the offline SFT demo
    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B           # generation server for vllm_mode="server"

Every field of the trainer's config is a flag (`llm-trainer sft --help` lists them). A YAML `--config` file sets
defaults for any flag, and its optional `env:` mapping sets environment variables.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

# Trainers of causal LMs whose constructor takes (model, args, train_dataset, eval_dataset, peft_config)
TRAINERS = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
    "kto": ("KTOConfig", "KTOTrainer"),
    "orpo": ("ORPOConfig", "ORPOTrainer"),
    "cpo": ("CPOConfig", "CPOTrainer"),
    "grpo": ("GRPOConfig", "GRPOTrainer"),
    "rloo": ("RLOOConfig", "RLOOTrainer"),
}
ONLINE = {"grpo", "rloo"}  # trainers that also take reward functions


@dataclass
class ScriptArguments:
    """What to train on (TRL's `ScriptArguments` fields)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name, local folder or data file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, when evaluating."})
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


@dataclass
class ModelArguments:
    """Which model, and how to load and adapt it (a subset of TRL's `ModelConfig`)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model name or local folder."})
    dtype: str = field(default="float32", metadata={"help": "'float32', 'bfloat16', 'float16' or 'auto'."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt."})


def _parse(config_cls, argv: list[str]):
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, config_cls, ModelArguments))
    if "--config" in argv:
        i = argv.index("--config")
        with open(argv[i + 1], encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        os.environ.update({k: str(v) for k, v in (values.pop("env", None) or {}).items()})
        parser.set_defaults(**values)
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(argv)


def train(name: str, argv: list[str]) -> None:
    """Run the `name` trainer with arguments parsed from `argv`."""
    import llm_trainer

    config_name, trainer_name = TRAINERS[name]
    script, config, model_args = _parse(getattr(llm_trainer, config_name), argv)
    if not model_args.model_name_or_path or not script.dataset_name:
        raise SystemExit(f"llm-trainer {name}: --model_name_or_path and --dataset_name are required.")
    from datasets import load_dataset

    dataset = load_dataset(script.dataset_name, script.dataset_config)
    config.model_init_kwargs = {**(config.model_init_kwargs or {}), "dtype": model_args.dtype}
    peft_config = None
    if model_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    evaluating = config.eval_strategy != "no"
    extra = {"reward_funcs": reward_functions(script)} if name in ONLINE else {}
    trainer = getattr(llm_trainer, trainer_name)(
        model=model_args.model_name_or_path,
        **extra,
        args=config,
        train_dataset=dataset[script.dataset_train_split],
        eval_dataset=dataset[script.dataset_test_split] if evaluating else None,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(config.output_dir)


def reward_functions(script: ScriptArguments) -> list:
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
            funcs.append(getattr(importlib.import_module(module), attribute))
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

    devices = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = [f"Platform: {platform.platform()}", f"Python version: {platform.python_version()}"]
    lines += [f"llm_trainer version: {ver('llm-trainer')}", f"PyTorch version: {torch.__version__}"]
    lines += [f"Devices: {devices}"]
    for package in ("transformers", "accelerate", "datasets", "peft", "triton", "deepspeed", "vllm", "trl"):
        lines.append(f"{package} version: {ver(package)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = [*TRAINERS, "env", "demo", "vllm-serve"]
    if not argv or argv[0] not in commands:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "env":
        print(env())
    elif command == "demo":
        from .demo import main as demo

        demo(rest)
    elif command == "vllm-serve":
        from .generation.server import main as vllm_serve

        vllm_serve(rest)
    else:
        train(command, rest)


if __name__ == "__main__":
    main()

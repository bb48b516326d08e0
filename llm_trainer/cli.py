"""`llm-trainer`: train from the command line, TRL-CLI style.

    llm-trainer ALGORITHMS --model_name_or_path ... --dataset_name ... --output_dir out
    llm-trainer sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --output_dir out
    llm-trainer sft --config run.yaml --learning_rate 1e-5     # flags override the YAML
    llm-trainer sft --accelerate_config fsdp2 --num_processes 8 ...  # relaunched under `accelerate launch`
    llm-trainer grpo ... --reward_funcs think_format_reward my_rewards.length_reward  # names or import paths
    llm-trainer vllm-serve --model Qwen/Qwen2.5-0.5B           # a generation server for `vllm_mode="server"`
    llm-trainer train-serve --model Qwen/Qwen2.5-0.5B          # a remote training service (llm_trainer.remote)
    llm-trainer run my_trl_script.py --flag value ...          # an unmodified TRL script, run on llm_trainer
    llm-trainer env                                            # versions, for bug reports
    llm-trainer demo                                           # the offline SFT demo

Every field of the trainer's config, of `ModelConfig` and of `ScriptArguments` is a flag (`llm-trainer sft --help`
lists them); distillation takes `--teacher_model_name_or_path`, teacher_grpo `--student_model_name_or_path`, ppo
`--reward_model_path` (and prompts it tokenizes). A YAML `--config` file sets defaults for any flag, its optional `env:` mapping sets environment
variables, and a `datasets:` list (see `DatasetMixtureConfig`) trains on a mixture instead of `--dataset_name`.
"""

from __future__ import annotations

import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from .scripts import _training
from .scripts.utils import TrlParser


def train(name: str, argv: list[str]) -> None:
    """Run the `name` trainer with arguments parsed from `argv`, as TRL's script of that name does.

    Parsing is stricter than the scripts' own `__main__`: unknown flags and unknown keys of the `--config` YAML are
    usage errors (with a did-you-mean hint), and bad input is a one-line message instead of a traceback. With launch
    flags (`--accelerate_config NAME|PATH`, `--num_processes`, `--num_machines`, `--machine_rank`,
    `--main_process_ip`, `--main_process_port`; also as `--config` keys) the arguments are checked here, then the
    command runs again under `accelerate launch` with them, as `trl <name> --accelerate_config ...` does.
    """
    parser = _training.make_parser(
        name,
        prog=f"llm-trainer {name}",
        usage=f"llm-trainer {name} [--config run.yaml] [--flag value ...]  (`llm-trainer {name} --help` lists the flags)",
        epilog=LAUNCH_HELP,
    )
    try:
        launch, argv = _training.split_launch_arguments(argv)
        *parsed, config_unknown, unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        config_launch, config_unknown = _training.split_launch_arguments(config_unknown)
    except (OSError, TypeError, ValueError) as error:  # a launch flag, the --config file, a value a config rejects
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(parser, unknown)}")
    if config_unknown:
        keys = ", ".join(key.removeprefix("--") for key in config_unknown[::2])
        parser.error(f"unknown keys in the --config file: {keys}{_did_you_mean(parser, config_unknown[::2])}")
    try:
        if not _training.launched():  # in a launched process, the YAML's launch keys were used by its launcher
            launch = {**config_launch, **launch}
        if launch:
            _training.relaunch(name, launch, argv)
        _training.main(name, *parsed)
    except _training.ScriptArgumentError as error:
        raise SystemExit(f"llm-trainer {name}: {error}") from None
    except _training.RewardImportError as error:
        raise SystemExit(str(error)) from None


LAUNCH_HELP = (
    "launch on several processes or machines: --accelerate_config NAME|PATH runs this command again under "
    "`accelerate launch --config_file` (shipped presets: single_gpu, multi_gpu, fsdp1, fsdp2, zero1, zero2, zero3; "
    "or your own accelerate config file), with --num_processes N (total over machines; default for a preset: the "
    "visible GPUs), --num_machines M, --machine_rank R, --main_process_ip IP, --main_process_port P passed on. "
    "These may also be keys of the --config YAML. See docs/scaling_out.md."
)


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


_COMMANDS = {
    "demo": (".demo", "main"),
    "vllm-serve": (".scripts.vllm_serve", "cli"),
    "run": (".run", "run"),
    "train-serve": (".scripts.train_serve", "cli"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = [*_training.TRAINERS, "env", *_COMMANDS]
    if not argv or argv[0] not in commands:
        print(__doc__.replace("ALGORITHMS", "|".join(_training.TRAINERS), 1))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "env":
        print(env())
    elif command in _COMMANDS:  # imported only when run
        module, function = _COMMANDS[command]
        getattr(importlib.import_module(module, __package__), function)(rest)
    else:
        train(command, rest)


if __name__ == "__main__":
    main()

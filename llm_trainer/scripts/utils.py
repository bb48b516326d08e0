"""What TRL's example scripts are built from: `ScriptArguments`, dataset mixtures, and `TrlParser` (flags + YAML)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._hf_argparser import DataClass, DataClassType, HfArgumentParser

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

__all__ = [
    "DataClass",
    "DataClassType",
    "DatasetConfig",
    "DatasetMixtureConfig",
    "ScriptArguments",
    "TrlParser",
    "get_dataset",
    "get_git_commit_hash",
    "init_zero_verbose",
]


@dataclass
class DatasetConfig:
    """One dataset of a mixture; the fields are `datasets.load_dataset` arguments, plus `columns` and `fraction`.

    `columns` keeps only those columns. `fraction` is the dataset's share of the mixture: set it on every dataset or
    on none (see `get_dataset`).
    """

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None


@dataclass
class DatasetMixtureConfig:
    """Datasets to load and concatenate, usually given as a `datasets:` list in a script's YAML config:

    ```yaml
    datasets:
      - path: trl-lib/Capybara
        columns: [messages]
      - path: json
        data_files: extra.jsonl
    test_split_size: 0.05
    ```
    """

    datasets: list[DatasetConfig] = field(
        default_factory=list, metadata={"help": "Datasets of the mixture (a `datasets:` list in the YAML config)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Load the datasets in streaming mode."})
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Split the mixture into train and test with this `test_size` (a fraction or a row count); "
            "None keeps a single train split."
        },
    )

    def __post_init__(self) -> None:
        self.datasets = [DatasetConfig(**d) if isinstance(d, dict) else d for d in self.datasets]


@dataclass
class ScriptArguments:
    """Which dataset a script trains on; ignored in favour of `DatasetMixtureConfig.datasets` when that is set."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset to load: a Hub id, a local folder or a loader name such as 'json'."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (the `name` of `datasets.load_dataset`)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, when evaluating."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Load the dataset in streaming mode."})
    ignore_bias_buffers: bool = field(
        default=False,
        metadata={
            "help": "DDP workaround: make DistributedDataParallel skip the model's boolean buffers (attention "
            "masks), which it cannot broadcast."
        },
    )


def init_zero_verbose() -> None:
    """Quiet logging for command-line runs: errors only (through Rich when installed), warnings routed to logging.

    Call it at the top of a script, before the heavy imports.
    """
    from transformers.utils import is_rich_available

    if is_rich_available():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler()
    else:
        handler = logging.StreamHandler()
    logging.basicConfig(format="%(message)s", datefmt="[%X]", handlers=[handler], level=logging.ERROR)

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        logging.warning(f"{filename}:{lineno}: {category.__name__}: {message}")

    warnings.showwarning = log_warning


class TrlParser(HfArgumentParser):
    """`HfArgumentParser` that also reads a YAML `--config` file, as TRL's scripts expect.

    The YAML's keys set the flags' defaults, so flags given on the command line override them; its optional `env:`
    mapping is exported as environment variables before anything else is parsed. An optional (`X | None`) field that
    is not a string also accepts `none` / `null` on the command line, e.g. `--max_length none`.

        parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
        script_args, training_args, model_args = parser.parse_args_and_config()  # python sft.py --config run.yaml
    """

    def __init__(self, dataclass_types: Any = None, **kwargs: Any):
        if dataclass_types is None:
            dataclass_types = []
        elif not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        for dataclass_type in dataclass_types:
            if "config" in dataclass_type.__dataclass_fields__:
                raise ValueError(
                    f"Dataclass {dataclass_type.__name__} has a field named 'config', which `TrlParser` reserves "
                    "for the YAML config file path: rename the field."
                )
        super().__init__(dataclass_types=dataclass_types, **kwargs)

    def parse_args_and_config(
        self,
        args: Iterable[str] | None = None,
        return_remaining_strings: bool = False,
        fail_with_unknown_args: bool = True,
        separate_remaining_strings: bool = False,
    ) -> tuple:
        """Parse `args` (default `sys.argv[1:]`) and the YAML file named by `--config` into the dataclasses.

        Keys of the YAML that match no flag raise a `ValueError` when `fail_with_unknown_args`, unless
        `return_remaining_strings`: then they are returned, as `--key value` strings, after the dataclasses —
        together with the unknown command-line strings, or as a separate list before them when
        `separate_remaining_strings`.
        """
        import yaml

        args = list(sys.argv[1:] if args is None else args)
        config_remaining: list[str] = []
        config_path = None
        for i, arg in enumerate(args):
            if arg == "--config":
                if i + 1 == len(args):
                    raise ValueError("`--config` needs a value: the path of a YAML config file.")
                config_path = args[i + 1]
                del args[i : i + 2]
                break
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                del args[i]
                break
        if config_path is not None:
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
            except (FileNotFoundError, IsADirectoryError):
                where = "" if os.path.isabs(config_path) else f" (relative to {os.getcwd()})"
                raise FileNotFoundError(
                    f"--config {config_path}: no such file{where}; pass the path of a YAML file."
                ) from None
            except yaml.YAMLError as error:
                raise ValueError(f"Config file {config_path} is not valid YAML: {error}") from None
            if not isinstance(config, dict):
                raise ValueError(f"Config file {config_path} must contain a YAML mapping of argument names to values.")
            if "env" in config:
                env = config.pop("env")
                if not isinstance(env, dict):
                    raise ValueError(
                        f"`env` field should be a dict in the YAML file: `env` in {config_path} must be a mapping of "
                        "environment variable names to values."
                    )
                os.environ.update({str(key): str(value) for key, value in env.items()})
            config_remaining = self.set_defaults_with_config(**config)

        output = self.parse_args_into_dataclasses(args=args, return_remaining_strings=return_remaining_strings)
        if return_remaining_strings:
            *dataclasses_, args_remaining = output
            if separate_remaining_strings:
                return (*dataclasses_, config_remaining, args_remaining)
            return (*dataclasses_, config_remaining + args_remaining)
        if fail_with_unknown_args and config_remaining:
            raise ValueError(
                f"Unknown arguments in the config file: {config_remaining}. Remove them, add them to a dataclass, or "
                "pass `fail_with_unknown_args=False`."
            )
        return output

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """Make `kwargs` the defaults of the matching arguments (subparsers included), which stop being required.

        Returns the keys no argument matched, as `["--key", "value", ...]`.
        """
        import argparse

        def apply(parser: argparse.ArgumentParser) -> set[str]:
            used = set()
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for subparser in action.choices.values():
                        used |= apply(subparser)
                elif action.dest in kwargs:
                    action.default = kwargs[action.dest]
                    action.required = False
                    used.add(action.dest)
            return used

        used = apply(self)
        return [item for key, value in kwargs.items() if key not in used for item in (f"--{key}", str(value))]


def get_git_commit_hash(package_name: str) -> str | None:
    """The git commit a source checkout of `package_name` is at (for bug reports), or None for an installed wheel.

    Looks for a `.git` folder next to the package's folder. Never raises: a failure comes back as `"Error: ..."`.
    """
    import importlib
    import inspect
    import subprocess

    try:
        package_dir = os.path.dirname(inspect.getfile(importlib.import_module(package_name)))
        repo = os.path.abspath(os.path.join(package_dir, ".."))
        if not os.path.isdir(os.path.join(repo, ".git")):
            return None
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo).decode().strip()
    except Exception as error:  # a diagnostic: report the failure in the value instead of failing the caller
        return f"Error: {error}"


def load_data_file(path: str, streaming: bool = False) -> Any:
    """One local data file (.json, .jsonl, .csv, .parquet, .txt) as a `Dataset` (an `IterableDataset` when
    `streaming`), read as `llm_trainer.train()` reads it."""
    from ..trainer.simple import load_training_dataset

    dataset = load_training_dataset(path)
    return dataset.to_iterable_dataset() if streaming else dataset


def get_dataset(mixture_config: DatasetMixtureConfig) -> DatasetDict:
    """Load the datasets of `mixture_config`, concatenate them, and split off a test set if `test_split_size` is set.

    With `fraction`s, they are normalized into shares of the mixture, whose size is the largest for which no dataset
    needs more rows than it has: each dataset contributes its first `round(share * size)` rows.
    """
    import datasets

    if not mixture_config.datasets:
        raise ValueError("No datasets were loaded: the mixture is empty; list at least one dataset in `datasets`.")
    loaded = []
    for config in mixture_config.datasets:
        logger.info("Loading %s (configuration %s) for the mixture", config.path, config.name)
        if os.path.isfile(config.path) and config.data_files is None:
            dataset = load_data_file(config.path, mixture_config.streaming)
        else:
            dataset = datasets.load_dataset(
                path=config.path,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                split=config.split,
                streaming=mixture_config.streaming,
            )
        loaded.append(dataset if config.columns is None else dataset.select_columns(config.columns))

    fractions = [config.fraction for config in mixture_config.datasets]
    if any(fraction is not None for fraction in fractions):
        if any(fraction is None for fraction in fractions):
            raise ValueError(
                "`fraction` must be set for either all datasets in the mixture or none of them: set it on all of them or none."
            )
        if mixture_config.streaming:
            raise ValueError(
                "Using a dataset `fraction` is not supported with streaming datasets: it needs their sizes, which "
                "streaming datasets lack; drop one of the two."
            )
        if any(fraction < 0 for fraction in fractions) or sum(fractions) <= 0:
            raise ValueError(f"Invalid `fraction`s {fractions}: they must be non-negative, with a positive sum.")
        shares = [fraction / sum(fractions) for fraction in fractions]
        size = min(len(dataset) / share for dataset, share in zip(loaded, shares) if share > 0)
        loaded = [dataset.select(range(round(share * size))) for dataset, share in zip(loaded, shares)]

    mixture = datasets.concatenate_datasets(loaded)
    if mixture_config.test_split_size is not None:
        return mixture.train_test_split(test_size=mixture_config.test_split_size)
    return datasets.DatasetDict({"train": mixture})

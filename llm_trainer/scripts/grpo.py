"""TRL's `grpo` training script (`trl.scripts.grpo`) on llm_trainer: `python -m llm_trainer.scripts.grpo --help`.

Its script arguments, `GRPOScriptArguments`, add `--reward_funcs` (built-in reward names or `module.function`
import paths) and `--reward_model_name_or_path`. The same run as `llm-trainer grpo`: both use the one
implementation in `llm_trainer.scripts._training`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import _training
from ._training import GRPOScriptArguments
from .utils import DatasetMixtureConfig, TrlParser

if TYPE_CHECKING:
    from ..trainer.grpo_config import GRPOConfig
    from ..trainer.model_config import ModelConfig

__all__ = ["GRPOScriptArguments", "main", "make_parser"]


def main(
    script_args: GRPOScriptArguments,
    training_args: GRPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train on the parsed arguments (see `make_parser`) and save the model to `training_args.output_dir`."""
    _training.main("grpo", script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The script's `TrlParser`: standalone, or the `grpo` command added to `subparsers`."""
    return _training.make_parser("grpo", subparsers, prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

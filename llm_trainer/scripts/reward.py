"""TRL's `reward` training script (`trl.scripts.reward`) on llm_trainer: `python -m llm_trainer.scripts.reward --help`.

The same run as `llm-trainer reward`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import _training
from .utils import DatasetMixtureConfig, ScriptArguments, TrlParser

if TYPE_CHECKING:
    from ..trainer.model_config import ModelConfig
    from ..trainer.reward_config import RewardConfig

__all__ = ["main", "make_parser"]


def main(
    script_args: ScriptArguments,
    training_args: RewardConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train on the parsed arguments (see `make_parser`) and save the model to `training_args.output_dir`."""
    _training.main("reward", script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The script's `TrlParser`: standalone, or the `reward` command added to `subparsers`."""
    return _training.make_parser("reward", subparsers, prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

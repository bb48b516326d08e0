"""TRL's `rloo` training script (`trl.scripts.rloo`) on llm_trainer: `python -m llm_trainer.scripts.rloo --help`.

Its script arguments, `RLOOScriptArguments`, add `--reward_funcs` (built-in reward names or `module.function`
import paths) and `--reward_model_name_or_path`. The same run as `llm-trainer rloo`: both use the one
implementation in `llm_trainer.scripts._training`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import _training
from ._training import RLOOScriptArguments
from .utils import DatasetMixtureConfig, TrlParser

if TYPE_CHECKING:
    from ..trainer.model_config import ModelConfig
    from ..trainer.rloo_config import RLOOConfig

__all__ = ["RLOOScriptArguments", "main", "make_parser"]


def main(
    script_args: RLOOScriptArguments,
    training_args: RLOOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train on the parsed arguments (see `make_parser`) and save the model to `training_args.output_dir`."""
    _training.main("rloo", script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The script's `TrlParser`: standalone, or the `rloo` command added to `subparsers`."""
    return _training.make_parser("rloo", subparsers, prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

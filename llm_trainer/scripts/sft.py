"""TRL's `sft` training script (`trl.scripts.sft`) on llm_trainer: `python -m llm_trainer.scripts.sft --help`.

The same run as `llm-trainer sft`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import _training
from .utils import DatasetMixtureConfig, ScriptArguments, TrlParser

if TYPE_CHECKING:
    from ..trainer.model_config import ModelConfig
    from ..trainer.sft_config import SFTConfig

__all__ = ["main", "make_parser"]


def main(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train on the parsed arguments (see `make_parser`) and save the model to `training_args.output_dir`."""
    _training.main("sft", script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The script's `TrlParser`: standalone, or the `sft` command added to `subparsers`."""
    return _training.make_parser("sft", subparsers, prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

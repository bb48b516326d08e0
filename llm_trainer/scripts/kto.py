"""TRL's `kto` training script (`trl.scripts.kto`) on llm_trainer: `python -m llm_trainer.scripts.kto --help`.

The same run as `llm-trainer kto`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import _training
from .utils import DatasetMixtureConfig, ScriptArguments, TrlParser

if TYPE_CHECKING:
    from ..trainer.kto_config import KTOConfig
    from ..trainer.model_config import ModelConfig

__all__ = ["main", "make_parser"]


def main(
    script_args: ScriptArguments,
    training_args: KTOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """Train on the parsed arguments (see `make_parser`) and save the model to `training_args.output_dir`."""
    _training.main("kto", script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    """The script's `TrlParser`: standalone, or the `kto` command added to `subparsers`."""
    return _training.make_parser("kto", subparsers, prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))

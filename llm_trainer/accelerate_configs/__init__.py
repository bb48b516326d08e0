"""Launch presets for `accelerate launch --config_file`, shipped with the package.

`llm-trainer <algorithm> --accelerate_config NAME` picks one by name (`single_gpu`, `multi_gpu`, `fsdp1`, `fsdp2`,
`zero1`, `zero2`, `zero3`); `preset_path(NAME)` gives its file for `accelerate launch` directly. Every preset is
written for one node of 8 GPUs in bf16: `--num_processes`, `--num_machines` and friends override the counts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["PRESETS", "preset_path"]

PRESETS: tuple[str, ...] = ("single_gpu", "multi_gpu", "fsdp1", "fsdp2", "zero1", "zero2", "zero3")


def preset_path(name: str) -> Path:
    """The YAML file of the shipped preset `name` (without `.yaml`); `ValueError` naming the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"Unknown accelerate preset {name!r}: the shipped presets are {', '.join(PRESETS)}.")
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))

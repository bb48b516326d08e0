"""TRL's `distillation` training script (`trl.scripts.distillation`) on llm_trainer: `python -m llm_trainer.scripts.distillation --help`.

The same run as `llm-trainer distillation`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]

main, make_parser = script_entry_points("distillation")

if __name__ == "__main__":
    run_script("distillation")

"""TRL's `dpo` training script (`trl.scripts.dpo`) on llm_trainer: `python -m llm_trainer.scripts.dpo --help`.

The same run as `llm-trainer dpo`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]

main, make_parser = script_entry_points("dpo")

if __name__ == "__main__":
    run_script("dpo")

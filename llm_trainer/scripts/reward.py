"""TRL's `reward` training script (`trl.scripts.reward`) on llm_trainer: `python -m llm_trainer.scripts.reward --help`.

The same run as `llm-trainer reward`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]

main, make_parser = script_entry_points("reward")

if __name__ == "__main__":
    run_script("reward")

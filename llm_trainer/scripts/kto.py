"""TRL's `kto` training script (`trl.scripts.kto`) on llm_trainer: `python -m llm_trainer.scripts.kto --help`.

The same run as `llm-trainer kto`: both use the one implementation in `llm_trainer.scripts._training`.
"""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]

main, make_parser = script_entry_points("kto")

if __name__ == "__main__":
    run_script("kto")

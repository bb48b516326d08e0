"""TRL's `trl.scripts.dpo`: `python -m llm_trainer.scripts.dpo` is `llm-trainer dpo` (`scripts._training`)."""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]
main, make_parser = script_entry_points("dpo")

if __name__ == "__main__":
    run_script("dpo")

"""TRL's `trl.scripts.reward`: `python -m llm_trainer.scripts.reward` is `llm-trainer reward` (`scripts._training`)."""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]
main, make_parser = script_entry_points("reward")

if __name__ == "__main__":
    run_script("reward")

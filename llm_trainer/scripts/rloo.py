"""TRL's `trl.scripts.rloo`: `python -m llm_trainer.scripts.rloo` is `llm-trainer rloo` (`scripts._training`)."""

from ._training import RLOOScriptArguments, run_script, script_entry_points

__all__ = ["RLOOScriptArguments", "main", "make_parser"]
main, make_parser = script_entry_points("rloo")

if __name__ == "__main__":
    run_script("rloo")

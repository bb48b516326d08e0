"""TRL's `trl.scripts.sft`: `python -m llm_trainer.scripts.sft` is `llm-trainer sft` (`scripts._training`)."""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]
main, make_parser = script_entry_points("sft")

if __name__ == "__main__":
    run_script("sft")

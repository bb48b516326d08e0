"""TRL's `trl.scripts.kto`: `python -m llm_trainer.scripts.kto` is `llm-trainer kto` (`scripts._training`)."""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]
main, make_parser = script_entry_points("kto")

if __name__ == "__main__":
    run_script("kto")

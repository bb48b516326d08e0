"""TRL's `trl.scripts.distillation`: `python -m llm_trainer.scripts.distillation` is `llm-trainer distillation` (`scripts._training`)."""

from ._training import run_script, script_entry_points

__all__ = ["main", "make_parser"]
main, make_parser = script_entry_points("distillation")

if __name__ == "__main__":
    run_script("distillation")

"""TRL's `trl.scripts.grpo`: `python -m llm_trainer.scripts.grpo` is `llm-trainer grpo` (`scripts._training`)."""

from ._training import GRPOScriptArguments, run_script, script_entry_points

__all__ = ["GRPOScriptArguments", "main", "make_parser"]
main, make_parser = script_entry_points("grpo")

if __name__ == "__main__":
    run_script("grpo")

"""TRL's `rloo` training script (`trl.scripts.rloo`) on llm_trainer: `python -m llm_trainer.scripts.rloo --help`.

Its script arguments, `RLOOScriptArguments`, add `--reward_funcs` (built-in reward names or `module.function`
import paths) and `--reward_model_name_or_path`. The same run as `llm-trainer rloo`: both use the one
implementation in `llm_trainer.scripts._training`.
"""

from ._training import RLOOScriptArguments, run_script, script_entry_points

__all__ = ["RLOOScriptArguments", "main", "make_parser"]

main, make_parser = script_entry_points("rloo")

if __name__ == "__main__":
    run_script("rloo")

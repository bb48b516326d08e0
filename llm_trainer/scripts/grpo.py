"""TRL's `grpo` training script (`trl.scripts.grpo`) on llm_trainer: `python -m llm_trainer.scripts.grpo --help`.

Its script arguments, `GRPOScriptArguments`, add `--reward_funcs` (built-in reward names or `module.function`
import paths) and `--reward_model_name_or_path`. The same run as `llm-trainer grpo`: both use the one
implementation in `llm_trainer.scripts._training`.
"""

from ._training import GRPOScriptArguments, run_script, script_entry_points

__all__ = ["GRPOScriptArguments", "main", "make_parser"]

main, make_parser = script_entry_points("grpo")

if __name__ == "__main__":
    run_script("grpo")

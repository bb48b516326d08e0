"""Run an unmodified TRL script on llm_trainer: `python -m llm_trainer.run my_trl_script.py [script args]`.

The same as `llm-trainer run my_trl_script.py ...`, and launchable as a module, so distributed runs work too:
`accelerate launch -m llm_trainer.run sft.py ...`, `torchrun --nproc_per_node 2 -m llm_trainer.run sft.py ...`.
`trl` and every `trl.*` module resolve to their llm_trainer twins (see `llm_trainer.trl_alias`); the script runs as
`__main__` with `sys.argv` set to `[script, *args]`, so its `if __name__ == "__main__":` block and its argument
parser see exactly the arguments given after it. `-m package.module` runs a module instead of a file.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

from . import trl_alias

USAGE = """usage: llm-trainer run SCRIPT.py [script args ...]
       llm-trainer run -m MODULE [script args ...]
       python -m llm_trainer.run SCRIPT.py [script args ...]

Run a script written for TRL, unmodified, on llm_trainer: `import trl` / `from trl.x import y` resolve to
llm_trainer's twins; anything without a twin fails at its import, naming the TRL module or name."""


def run(argv: list[str]) -> None:
    """Run the script (or `-m` module) named first in `argv` as `__main__`, with the rest as its arguments."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] == "-m" and len(argv) < 2:
        raise SystemExit(f"llm-trainer run: -m needs a module name.\n{USAGE}")
    module = argv[1] if argv[0] == "-m" else None
    script, args = (None, argv[2:]) if module else (argv[0], argv[1:])
    if script is not None and not os.path.isfile(script):
        raise SystemExit(f"llm-trainer run: no script at {script!r}.\n{USAGE}")
    trl_alias.install()
    try:
        if module is not None:
            # A `trl.*` module runs as its twin: the alias loader hands over module objects, not code to run.
            if module == trl_alias.ALIAS or module.startswith(trl_alias.ALIAS + "."):
                twin = trl_alias.twin_name(module)
                try:
                    found = importlib.util.find_spec(twin) is not None
                except ModuleNotFoundError:  # a parent package is absent too
                    found = False
                if not found:
                    raise trl_alias.MissingTwinError(f"`{module}` has no llm_trainer twin yet (looked for `{twin}`).")
                module = twin
            sys.argv = [module, *args]  # run_module puts the module's file in argv[0]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
            runpy.run_path(script, run_name="__main__")
    except ImportError as error:
        clearer = trl_alias.missing_name_error(error)
        if clearer is None:
            raise
        raise clearer.with_traceback(error.__traceback__) from None


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()

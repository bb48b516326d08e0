"""The judges at TRL's later path, `trl.experimental.judges` (TRL removed them in 2026); same objects as `llm_trainer.judges`."""

from ...judges import *  # noqa: F403
from ...judges import __all__  # noqa: F401

"""TRL's `trl.kernels.logprob_entropy` path: `selective_log_softmax_and_entropy` (defined in `llm_trainer.kernels`)."""

from . import selective_log_softmax_and_entropy

__all__ = ["selective_log_softmax_and_entropy"]
